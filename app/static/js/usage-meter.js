// The signed-in user's token use against their budgets, in the chat page's top bar
// (GET /api/auth/me/usage). Separate from chat.js: it only watches the page. It refreshes when the
// chat view appears, when a reply ends (the Stop button hides), on focus and once a minute.

import { api } from "./api.js";

const REFRESH_MS = 60_000;
const meter = document.getElementById("usage-meter");
const chatView = document.getElementById("chat-view");
const stopButton = document.getElementById("stop");
let timer = null;

function periodLabel(period) {
  return period === "day" ? "today" : "this month";
}

/** "14:00 UTC" for a reset within a day, else "1 Dec". */
function resetLabel(iso) {
  const date = new Date(iso);
  if (date.getTime() - Date.now() < 24 * 3600 * 1000) {
    return date.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
  }
  return date.toLocaleDateString(undefined, { day: "numeric", month: "short" });
}

function render(usage) {
  const mine = usage.budgets.filter((item) => item.scope === "user");
  const exhausted = mine.filter((item) => item.budget !== null && item.used >= item.budget);
  const parts = mine.map((item) => {
    const used = item.used.toLocaleString();
    const text = item.budget === null ? `${used}` : `${used} / ${item.budget.toLocaleString()}`;
    return `${text} ${periodLabel(item.period)}`;
  });
  meter.textContent = `Tokens: ${parts.join(" · ")}`;
  meter.dataset.state = exhausted.length ? "exhausted" : mine.some((item) => item.budget !== null && item.used >= 0.8 * item.budget) ? "low" : "ok";
  if (exhausted.length) {
    const last = exhausted.reduce((a, b) => (new Date(a.resets_at) > new Date(b.resets_at) ? a : b));
    meter.textContent += ` — budget used up, resets ${resetLabel(last.resets_at)}`;
  }
  meter.title = mine
    .map((item) => {
      const budget = item.budget === null ? "no budget" : `budget ${item.budget.toLocaleString()}`;
      return `${periodLabel(item.period)}: ${item.used.toLocaleString()} tokens used, ${budget}, resets ${new Date(item.resets_at).toLocaleString()}`;
    })
    .join("\n");
  meter.hidden = false;
}

async function refresh() {
  if (!meter || chatView.hidden) return;
  try {
    render(await api("GET", "/api/auth/me/usage"));
  } catch {
    meter.hidden = true; // signed out or the server is away: the chat page says so itself
  }
}

function schedule() {
  clearInterval(timer);
  timer = chatView.hidden ? null : setInterval(refresh, REFRESH_MS);
}

if (meter && chatView) {
  new MutationObserver(() => {
    if (chatView.hidden) meter.hidden = true;
    else refresh();
    schedule();
  }).observe(chatView, { attributes: true, attributeFilter: ["hidden"] });
  if (stopButton) {
    new MutationObserver(() => {
      if (stopButton.hidden) refresh();
    }).observe(stopButton, { attributes: true, attributeFilter: ["hidden"] });
  }
  window.addEventListener("focus", refresh);
  refresh();
  schedule();
}
