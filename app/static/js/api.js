// Same-origin calls to the Zeus API with the session cookie. Errors become ApiError with the
// HTTP status, the server's detail and Retry-After, so pages can say what happened and when to retry.

export class ApiError extends Error {
  constructor(status, detail, { retryAfterS = null } = {}) {
    super(detail);
    this.name = "ApiError";
    this.status = status;
    this.detail = detail;
    this.retryAfterS = retryAfterS;
  }

  get lostConnection() {
    return this.status === 0;
  }
}

function parseRetryAfter(header) {
  if (!header) return null;
  const seconds = Number(header);
  if (Number.isFinite(seconds)) return Math.max(0, Math.ceil(seconds));
  const date = Date.parse(header);
  return Number.isNaN(date) ? null : Math.max(0, Math.ceil((date - Date.now()) / 1000));
}

// FastAPI answers {"detail": "text"} or, for validation errors, {"detail": [{loc, msg}, ...]}.
function detailText(body, fallback) {
  const detail = body?.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((item) => {
        const field = Array.isArray(item.loc) ? item.loc.filter((part) => part !== "body").join(".") : "";
        return field ? `${field}: ${item.msg}` : String(item.msg ?? item);
      })
      .join("; ");
  }
  if (body?.error?.message) return body.error.message;
  return fallback;
}

/** fetch() that resolves only on 2xx; anything else throws ApiError (status 0: no connection). */
export async function send(method, path, body, { signal } = {}) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" }, signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "Lost connection to the server.");
  }
  if (response.ok) return response;
  let parsed = null;
  try {
    parsed = await response.json();
  } catch {
    // A proxy error page is HTML, not JSON: the status line is all we can report.
  }
  const error = new ApiError(response.status, detailText(parsed, response.statusText || "request failed"), {
    retryAfterS: parseRetryAfter(response.headers.get("Retry-After")),
  });
  if (response.status === 401) window.dispatchEvent(new CustomEvent("zeus:unauthorized", { detail: error }));
  throw error;
}

export async function api(method, path, body, options) {
  const response = await send(method, path, body, options);
  if (response.status === 204) return null;
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

/** One sentence for the person in front of the page: what went wrong and what to do. */
export function describeError(error) {
  if (!(error instanceof ApiError)) return `Unexpected error: ${error?.message ?? error}`;
  const { status, detail, retryAfterS } = error;
  if (status === 0) return "Lost connection to the server. Check your network, then retry.";
  if (status === 401) return "Your session has ended. Please sign in again.";
  if (status === 429) {
    const wait = retryAfterS !== null ? `Retry in ${retryAfterS} s.` : "Retry in a moment.";
    return `${detail ? `${detail.replace(/\.?$/, ".")} ` : ""}${wait}`;
  }
  if (status >= 500) {
    return `Server error (${status}${detail && detail !== "request failed" ? `: ${detail}` : ""}). Please retry; if it keeps happening, tell an administrator.`;
  }
  return detail;
}
