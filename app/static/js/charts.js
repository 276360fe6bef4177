// A small time-series line chart on <canvas>: enough for the dashboard's two 15-minute charts
// without a charting library. The canvas carries a text summary for screen readers.

function niceCeiling(value) {
  if (!(value > 0)) return 1;
  const magnitude = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (value <= step * magnitude) return step * magnitude;
  }
  return 10 * magnitude;
}

function formatAxis(value) {
  if (value >= 1000) return `${(value / 1000).toFixed(value >= 10000 ? 0 : 1)}k`;
  if (value >= 10 || Number.isInteger(value)) return String(Math.round(value));
  return String(Number(value.toFixed(value < 1 ? 2 : 1)));
}

/**
 * points: [{t: epoch ms, v: number}] sorted by t; windowMs: the span shown, ending at `now`.
 * label/unit describe the series for the accessible summary.
 */
export function drawLineChart(canvas, points, { windowMs, now = Date.now(), label, unit }) {
  const styles = getComputedStyle(canvas);
  const lineColor = styles.getPropertyValue("--accent").trim() || "#3b5bdb";
  const gridColor = styles.getPropertyValue("--border").trim() || "#d9dde3";
  const textColor = styles.getPropertyValue("--muted").trim() || "#5b6474";
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 320;
  const height = canvas.clientHeight || 160;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  context.clearRect(0, 0, width, height);

  const padding = { left: 40, right: 10, top: 10, bottom: 22 };
  const plotWidth = width - padding.left - padding.right;
  const plotHeight = height - padding.top - padding.bottom;
  const start = now - windowMs;
  const visible = points.filter((point) => point.t >= start && point.t <= now && Number.isFinite(point.v));
  const peak = visible.reduce((max, point) => Math.max(max, point.v), 0);
  const top = niceCeiling(peak);
  const x = (t) => padding.left + ((t - start) / windowMs) * plotWidth;
  const y = (v) => padding.top + plotHeight - (v / top) * plotHeight;

  context.font = `11px ${styles.fontFamily}`;
  context.lineWidth = 1;
  context.strokeStyle = gridColor;
  context.fillStyle = textColor;
  context.textAlign = "right";
  context.textBaseline = "middle";
  for (const fraction of [0, 0.5, 1]) {
    const value = top * fraction;
    const lineY = Math.round(y(value)) + 0.5;
    context.beginPath();
    context.moveTo(padding.left, lineY);
    context.lineTo(width - padding.right, lineY);
    context.stroke();
    context.fillText(formatAxis(value), padding.left - 6, lineY);
  }
  context.textBaseline = "top";
  const minutes = Math.round(windowMs / 60000);
  for (const ago of [minutes, Math.round((minutes * 2) / 3), Math.round(minutes / 3), 0]) {
    const tickX = x(now - ago * 60000);
    context.textAlign = ago === minutes ? "left" : ago === 0 ? "right" : "center";
    context.fillText(ago === 0 ? "now" : `−${ago} min`, ago === minutes ? padding.left : tickX, height - 16);
  }

  if (visible.length === 0) {
    context.textAlign = "center";
    context.textBaseline = "middle";
    context.fillText("no samples yet", padding.left + plotWidth / 2, padding.top + plotHeight / 2);
  } else {
    context.beginPath();
    visible.forEach((point, index) => {
      if (index === 0) context.moveTo(x(point.t), y(point.v));
      else context.lineTo(x(point.t), y(point.v));
    });
    context.strokeStyle = lineColor;
    context.lineWidth = 2;
    context.lineJoin = "round";
    context.stroke();
    context.lineTo(x(visible[visible.length - 1].t), y(0));
    context.lineTo(x(visible[0].t), y(0));
    context.closePath();
    context.globalAlpha = 0.12;
    context.fillStyle = lineColor;
    context.fill();
    context.globalAlpha = 1;
  }

  const latest = visible.length ? visible[visible.length - 1].v : null;
  canvas.setAttribute(
    "aria-label",
    latest === null
      ? `${label}: no samples in the last ${minutes} minutes`
      : `${label} over the last ${minutes} minutes: now ${formatAxis(latest)} ${unit}, peak ${formatAxis(peak)} ${unit}`,
  );
}
