// Fair share and quotas on the admin page: a dialog for one user's or one API key's concurrency
// limit and daily/monthly token budgets (and a key's expiry). Empty fields use the default
// (ZEUS_MAX_CONCURRENT_PER_USER, ZEUS_DAILY_TOKEN_BUDGET, ZEUS_MONTHLY_TOKEN_BUDGET; unlimited
// unless set); a key's own limits apply on top of its owner's.

import { api, describeError } from "./api.js";
import { h } from "./dom.js";

const FIELDS = [
  { name: "max_concurrent", label: "Concurrent generations (all instances)", min: 1 },
  { name: "daily_token_budget", label: "Tokens per day (UTC)", min: 0 },
  { name: "monthly_token_budget", label: "Tokens per month (UTC)", min: 0 },
];

/** "2027-01-31T12:00" in the browser's time zone, for <input type=datetime-local>. */
function localInputValue(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  const local = new Date(date.getTime() - date.getTimezoneOffset() * 60_000);
  return local.toISOString().slice(0, 16);
}

function usageText(usage) {
  const parts = usage.budgets
    .filter((item) => item.scope === "user")
    .map((item) => {
      const budget = item.budget === null ? "unlimited" : item.budget.toLocaleString();
      return `${item.period === "day" ? "today" : "this month"} ${item.used.toLocaleString()} of ${budget} tokens`;
    });
  return `Now: ${usage.concurrency.active} of ${usage.concurrency.limit} generations running; ${parts.join(", ")}.`;
}

/**
 * Opens the dialog. kind "user" (target: an AdminUserOut) or "key" (an AdminKeyOut);
 * onSaved(updated) runs after a successful PATCH.
 */
export function openLimitsDialog(kind, target, onSaved) {
  const who = kind === "user" ? target.email : `the key “${target.name}” of ${target.email}`;
  const inputs = {};
  const fields = FIELDS.map(({ name, label, min }) => {
    inputs[name] = h("input", {
      id: `limits-${name}`,
      name,
      type: "number",
      min: String(min),
      step: "1",
      inputmode: "numeric",
      placeholder: kind === "user" ? "default" : "owner's only",
      value: target[name] ?? "",
    });
    return h("div", { class: "field" }, h("label", { for: `limits-${name}` }, label), inputs[name]);
  });
  if (kind === "key") {
    inputs.expires_at = h("input", {
      id: "limits-expires_at",
      name: "expires_at",
      type: "datetime-local",
      value: localInputValue(target.expires_at),
    });
    fields.push(
      h("div", { class: "field" }, h("label", { for: "limits-expires_at" }, "Expires (empty: never)"), inputs.expires_at),
    );
  }
  const current = h("p", { class: "muted", id: "limits-usage" }, "");
  const error = h("div", { class: "notice notice--error", role: "alert", hidden: true });
  const dialog = h(
    "dialog",
    { class: "dialog", "aria-labelledby": "limits-title" },
    h(
      "form",
      {
        method: "dialog",
        onsubmit: async (event) => {
          if (event.submitter?.value !== "save") return;
          event.preventDefault();
          const body = {};
          for (const { name } of FIELDS) {
            const raw = inputs[name].value.trim();
            body[name] = raw === "" ? null : Number(raw);
          }
          if (kind === "key") {
            const raw = inputs.expires_at.value;
            body.expires_at = raw ? new Date(raw).toISOString() : null;
          }
          const path = kind === "user" ? `/api/admin/users/${target.id}/limits` : `/api/admin/api-keys/${target.id}`;
          try {
            const updated = await api("PATCH", path, body);
            dialog.close();
            onSaved(updated);
          } catch (failure) {
            error.textContent = describeError(failure);
            error.hidden = false;
          }
        },
      },
      h("h2", { id: "limits-title" }, `Limits of ${who}`),
      h(
        "p",
        {},
        kind === "user"
          ? "Empty: the server's default. Budgets count prompt and completion tokens; over one, requests get 429 until it resets."
          : "Empty: none of its own (its owner's limits still apply).",
      ),
      current,
      ...fields,
      error,
      h(
        "div",
        { class: "dialog__actions" },
        h("button", { class: "btn", type: "submit", value: "cancel", formnovalidate: true }, "Cancel"),
        h("button", { class: "btn btn--primary", type: "submit", value: "save" }, "Save limits"),
      ),
    ),
  );
  dialog.addEventListener("close", () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
  if (kind === "user") {
    api("GET", `/api/admin/users/${target.id}/usage`)
      .then((usage) => {
        current.textContent = usageText(usage);
      })
      .catch(() => {});
  }
}
