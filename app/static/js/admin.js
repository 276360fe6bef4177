// The admin dashboard: system (instances, totals, 15-minute charts), users, usage, audit log, API keys.

import { openLimitsDialog } from "./admin-limits.js";
import { api, describeError } from "./api.js";
import { currentUser, setupLoginForm, signOut } from "./auth.js";
import { drawLineChart } from "./charts.js";
import { $, clear, confirmDialog, formatBytes, formatDateTime, formatNumber, formatRelative, h } from "./dom.js";
import { decorateIcons } from "./icons.js";

const SYSTEM_REFRESH_MS = 5000;
const CHART_WINDOW_MS = 15 * 60 * 1000;
const AUDIT_PAGE_SIZE = 50;
const PANELS = ["system", "users", "usage", "audit", "keys"];

const state = {
  user: null,
  panel: "system",
  systemTimer: null,
  lastSystem: null,
  auditPage: 1,
  auditPages: 1,
};

const ui = {
  bootView: $("#boot-view"),
  bootMessage: $("#boot-message"),
  bootRetry: $("#boot-retry"),
  loginView: $("#login-view"),
  refusedView: $("#refused-view"),
  adminView: $("#admin-view"),
  userEmail: $("#user-email"),
  tabs: [...document.querySelectorAll("[role=tab]")],
};

const login = setupLoginForm($("#login-form"), $("#login-error"), (user) => enter(user));

function showView(name) {
  ui.bootView.hidden = name !== "boot";
  ui.loginView.hidden = name !== "login";
  ui.refusedView.hidden = name !== "refused";
  ui.adminView.hidden = name !== "admin";
}

function showLogin(message = "") {
  stopSystemRefresh();
  state.user = null;
  login.showError(message);
  showView("login");
  $("#login-email").focus();
}

function showRefused(user) {
  stopSystemRefresh();
  $("#refused-email").textContent = user.email;
  $("#refused-role").textContent = user.role;
  showView("refused");
}

function panelNotice(name, text, kind = "error") {
  const box = $(`#${name}-error`);
  box.className = `notice notice--${kind}`;
  box.textContent = text ?? "";
  box.hidden = !text;
}

/** Common handling of a failed admin call: 401 signs out; 403 shows the refusal page when the
 * account lost its admin role meanwhile, else the server's reason (e.g. a rule about oneself). */
async function handleFailure(panel, error) {
  if (error.status === 401) return;
  if (error.status === 403) {
    const user = await currentUser().catch(() => null);
    if (user && user.role !== "admin") {
      showRefused(user);
      return;
    }
  }
  panelNotice(panel, describeError(error));
}

function cell(content, className = null) {
  return h("td", { class: className }, content);
}

// The engine under the device: "vllm · bfloat16 · awq · TP 2 · KV 34 %" (heartbeat's copy of
// /api/health's engine); nothing for instances that predate it.
function engineLine(engine) {
  if (!engine || !engine.kind) return null;
  const parts = [engine.kind, engine.dtype];
  if (engine.quantization) parts.push(engine.quantization);
  if (engine.tensor_parallel_size > 1) parts.push(`TP ${engine.tensor_parallel_size}`);
  if (engine.kv_cache_usage !== null && engine.kv_cache_usage !== undefined) {
    parts.push(`KV ${formatNumber(engine.kv_cache_usage * 100)} %`);
  }
  return h("div", { class: "muted", dataset: { engine: engine.kind } }, parts.filter(Boolean).join(" · "));
}

function emptyRow(table, columns, text) {
  $("tbody", table).append(h("tr", {}, h("td", { colspan: columns, class: "muted" }, text)));
}

// ---- tabs -------------------------------------------------------------------------------------

function selectPanel(name, { focus = false } = {}) {
  if (!PANELS.includes(name)) name = "system";
  state.panel = name;
  for (const tab of ui.tabs) {
    const selected = tab.dataset.panel === name;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(`#panel-${tab.dataset.panel}`).hidden = !selected;
    if (selected && focus) tab.focus();
  }
  if (window.location.hash !== `#${name}`) window.history.replaceState(null, "", `#${name}`);
  stopSystemRefresh();
  if (name === "system") refreshSystem();
  else if (name === "users") loadUsers();
  else if (name === "usage") loadUsage();
  else if (name === "audit") loadAudit();
  else if (name === "keys") loadKeys();
}

for (const tab of ui.tabs) {
  tab.addEventListener("click", () => selectPanel(tab.dataset.panel));
  tab.addEventListener("keydown", (event) => {
    const index = ui.tabs.indexOf(tab);
    const moves = { ArrowRight: 1, ArrowLeft: -1 };
    if (event.key in moves) {
      const next = ui.tabs[(index + moves[event.key] + ui.tabs.length) % ui.tabs.length];
      selectPanel(next.dataset.panel, { focus: true });
      event.preventDefault();
    } else if (event.key === "Home" || event.key === "End") {
      selectPanel(ui.tabs[event.key === "Home" ? 0 : ui.tabs.length - 1].dataset.panel, { focus: true });
      event.preventDefault();
    }
  });
}

// ---- system -----------------------------------------------------------------------------------

function stopSystemRefresh() {
  clearTimeout(state.systemTimer);
  state.systemTimer = null;
}

function timestampMs(value) {
  if (typeof value === "number") return value < 1e12 ? value * 1000 : value;
  return Date.parse(value);
}

// The instance's queue is a number of waiting requests, or the engine's {running, queued} object.
function queuedCount(queue) {
  if (queue === null || queue === undefined) return null;
  if (typeof queue === "number") return queue;
  return Number(queue.queued ?? queue.waiting ?? 0);
}

function sum(instances, pick) {
  return instances.reduce((total, instance) => total + (Number(pick(instance)) || 0), 0);
}

function renderTotals(system) {
  const instances = system.instances ?? [];
  const up = instances.filter((instance) => instance.state === "up");
  // The server's totals count only instances that are up; computed here too when a field is absent.
  const totals = system.totals ?? {};
  const total = (key, pick) => totals[key] ?? sum(up, pick);
  const upCount = totals.instances_up ?? up.length;
  const allCount = totals.instances_down !== undefined ? upCount + totals.instances_down : instances.length;
  const stats = [
    ["Instances up", `${upCount} / ${allCount}`],
    ["In flight", formatNumber(total("active_connections", (instance) => instance.in_flight))],
    ["Queue", formatNumber(total("queue", (instance) => queuedCount(instance.queue)))],
    ["Requests/s", formatNumber(total("requests_per_s", (instance) => instance.requests_per_s), 2)],
    ["Tokens/s", formatNumber(total("tokens_per_s", (instance) => instance.tokens_per_s), 1)],
    ["CPU", `${formatNumber(total("cpu_percent", (instance) => instance.cpu_percent))} %`],
    ["RAM", formatBytes(total("rss_bytes", (instance) => instance.rss_bytes))],
    [
      "GPU memory",
      up.some((instance) => instance.gpu_memory_bytes)
        ? formatBytes(total("gpu_memory_bytes", (instance) => instance.gpu_memory_bytes))
        : "—",
    ],
  ];
  const container = clear($("#system-totals"));
  for (const [label, text] of stats) {
    container.append(
      h(
        "div",
        { class: "card stat", dataset: { stat: label } },
        h("div", { class: "stat__label" }, label),
        h("div", { class: "stat__value" }, text),
      ),
    );
  }
}

function renderInstances(instances) {
  const table = $("#instances-table");
  const body = clear($("tbody", table));
  if (instances.length === 0) {
    emptyRow(table, 11, "No instance has reported a heartbeat yet.");
    return;
  }
  const sorted = [...instances].sort((a, b) =>
    `${a.host}:${String(a.port).padStart(5, "0")}`.localeCompare(`${b.host}:${String(b.port).padStart(5, "0")}`),
  );
  for (const instance of sorted) {
    const queue = instance.queue;
    const queueText =
      queue && typeof queue === "object"
        ? `${formatNumber(queuedCount(queue))} (${formatNumber(queue.running ?? 0)} running)`
        : formatNumber(queue);
    body.append(
      h(
        "tr",
        { dataset: { instance: instance.instance ?? `${instance.host}:${instance.port}` } },
        h("td", {}, h("strong", {}, `${instance.host}:${instance.port}`), instance.model ? h("div", { class: "muted" }, instance.model) : null),
        cell(h("span", { class: `badge badge--${instance.state === "up" ? "up" : "down"}` }, instance.state ?? "unknown")),
        h("td", {}, instance.device ?? "—", engineLine(instance.engine)),
        cell(instance.cpu_percent === null || instance.cpu_percent === undefined ? "—" : `${formatNumber(instance.cpu_percent)} %`, "num"),
        cell(formatBytes(instance.rss_bytes), "num"),
        cell(instance.gpu_memory_bytes ? formatBytes(instance.gpu_memory_bytes) : "—", "num"),
        cell(formatNumber(instance.in_flight), "num"),
        cell(queueText, "num"),
        cell(formatNumber(instance.requests_per_s, 2), "num"),
        cell(formatNumber(instance.tokens_per_s, 1), "num"),
        cell(h("time", { datetime: instance.last_heartbeat ?? "", title: formatDateTime(instance.last_heartbeat) }, formatRelative(instance.last_heartbeat))),
      ),
    );
  }
}

function renderCharts(history) {
  const now = Date.now();
  const series = (key) =>
    (history ?? [])
      .map((sample) => ({ t: timestampMs(sample.ts), v: Number(sample[key]) }))
      .filter((point) => Number.isFinite(point.t))
      .sort((a, b) => a.t - b.t);
  drawLineChart($("#chart-requests"), series("requests_per_s"), {
    windowMs: CHART_WINDOW_MS,
    now,
    label: "Requests per second",
    unit: "requests/s",
  });
  drawLineChart($("#chart-tokens"), series("tokens_per_s"), {
    windowMs: CHART_WINDOW_MS,
    now,
    label: "Generated tokens per second",
    unit: "tokens/s",
  });
}

async function refreshSystem() {
  stopSystemRefresh();
  try {
    const system = await api("GET", "/api/admin/system");
    state.lastSystem = system;
    panelNotice("system", "");
    renderTotals(system);
    renderInstances(system.instances ?? []);
    renderCharts(system.history);
    $("#system-updated").textContent = `Updated ${new Date().toLocaleTimeString()} · refreshes every ${SYSTEM_REFRESH_MS / 1000} s`;
  } catch (error) {
    handleFailure("system", error);
    if (error.status === 401 || error.status === 403) return;
  }
  if (state.panel === "system" && state.user && !ui.adminView.hidden) {
    state.systemTimer = setTimeout(refreshSystem, SYSTEM_REFRESH_MS);
  }
}

$("#system-refresh").addEventListener("click", refreshSystem);
window.addEventListener("resize", () => {
  if (state.panel === "system" && state.lastSystem) renderCharts(state.lastSystem.history);
});

// ---- users ------------------------------------------------------------------------------------

async function loadUsers() {
  const table = $("#users-table");
  let users;
  try {
    users = await api("GET", "/api/admin/users");
  } catch (error) {
    handleFailure("users", error);
    return;
  }
  const body = clear($("tbody", table));
  if (users.length === 0) emptyRow(table, 6, "No users.");
  for (const user of users) body.append(userRow(user));
}

function userRow(user) {
  const isSelf = state.user && String(user.id) === String(state.user.id);
  const roleSelect = h(
    "select",
    {
      "aria-label": `Role of ${user.email}`,
      disabled: isSelf,
      title: isSelf ? "You cannot change your own role" : null,
      onchange: async () => {
        const role = roleSelect.value;
        try {
          await api("PATCH", `/api/admin/users/${user.id}`, { role });
          panelNotice("users", `${user.email} is now ${role}.`, "info");
          user.role = role;
        } catch (error) {
          roleSelect.value = user.role;
          handleFailure("users", error);
        }
      },
    },
    ["analyst", "admin"].map((role) => h("option", { value: role, selected: role === user.role }, role)),
  );
  return h(
    "tr",
    { dataset: { userEmail: user.email } },
    cell(h("span", {}, user.email, isSelf ? h("span", { class: "muted" }, " (you)") : null)),
    cell(roleSelect),
    cell(
      h(
        "span",
        { class: `badge badge--${user.disabled ? "disabled" : "active"}` },
        user.disabled ? "disabled" : "active",
      ),
    ),
    cell(formatDateTime(user.created_at)),
    cell(user.last_login_at ? formatRelative(user.last_login_at) : "never"),
    cell(
      h(
        "div",
        { class: "row-actions" },
        h(
          "button",
          {
            class: user.disabled ? "btn btn--small" : "btn btn--small btn--danger",
            type: "button",
            "aria-label": `${user.disabled ? "Enable" : "Disable"} ${user.email}`,
            disabled: isSelf,
            title: isSelf ? "You cannot disable your own account" : null,
            onclick: () => setDisabled(user, !user.disabled),
          },
          user.disabled ? "Enable" : "Disable",
        ),
        h(
          "button",
          {
            class: "btn btn--small",
            type: "button",
            "aria-label": `Reset the password of ${user.email}`,
            onclick: () => resetPassword(user),
          },
          "Reset password",
        ),
        h(
          "button",
          {
            class: "btn btn--small",
            type: "button",
            "aria-label": `Limits of ${user.email}`,
            onclick: () =>
              openLimitsDialog("user", user, () => {
                panelNotice("users", `Saved the limits of ${user.email}.`, "info");
                loadUsers();
              }),
          },
          "Limits",
        ),
      ),
    ),
  );
}

async function setDisabled(user, disabled) {
  if (disabled) {
    const confirmed = await confirmDialog({
      title: `Disable ${user.email}?`,
      message: "They are signed out and can no longer sign in or use their API keys until enabled again.",
      confirmLabel: "Disable",
      danger: true,
    });
    if (!confirmed) return;
  }
  try {
    await api("PATCH", `/api/admin/users/${user.id}`, { disabled });
    panelNotice("users", `${user.email} is ${disabled ? "disabled" : "enabled"}.`, "info");
  } catch (error) {
    handleFailure("users", error);
  }
  await loadUsers();
}

function resetPassword(user) {
  const input = h("input", {
    id: "reset-password-input",
    name: "password",
    type: "password",
    autocomplete: "new-password",
  });
  const error = h("div", { class: "notice notice--error", role: "alert", hidden: true });
  const dialog = h(
    "dialog",
    { class: "dialog", "aria-labelledby": "reset-title" },
    h(
      "form",
      {
        method: "dialog",
        onsubmit: async (event) => {
          if (event.submitter?.value !== "reset") return;
          event.preventDefault();
          const body = input.value ? { password: input.value } : {};
          try {
            const result = await api("POST", `/api/admin/users/${user.id}/reset-password`, body);
            dialog.close();
            showNewPassword(user, result.password, Boolean(input.value));
          } catch (failure) {
            error.textContent = describeError(failure);
            error.hidden = false;
          }
        },
      },
      h("h2", { id: "reset-title" }, `Reset the password of ${user.email}`),
      h(
        "div",
        { class: "field" },
        h("label", { for: "reset-password-input" }, "New password (leave empty to generate one)"),
        input,
      ),
      error,
      h(
        "div",
        { class: "dialog__actions" },
        h("button", { class: "btn", type: "submit", value: "cancel", formnovalidate: true }, "Cancel"),
        h("button", { class: "btn btn--primary", type: "submit", value: "reset" }, "Reset password"),
      ),
    ),
  );
  dialog.addEventListener("close", () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
}

function showNewPassword(user, password, chosen) {
  const dialog = h(
    "dialog",
    { class: "dialog", "aria-labelledby": "new-password-title" },
    h(
      "form",
      { method: "dialog" },
      h("h2", { id: "new-password-title" }, "Password reset"),
      h(
        "p",
        {},
        chosen
          ? `${user.email} can now sign in with the password you chose.`
          : `The new password of ${user.email} is shown once: pass it on securely.`,
      ),
      chosen ? null : h("code", { class: "secret", "data-secret": "password" }, password),
      h("div", { class: "dialog__actions" }, h("button", { class: "btn btn--primary", type: "submit" }, "Done")),
    ),
  );
  dialog.addEventListener("close", () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
}

$("#create-user").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  const email = form.elements.email.value.trim();
  const password = form.elements.password.value;
  const role = form.elements.role.value;
  if (!email || !password) {
    panelNotice("users", "Enter an email address and a password for the new user.");
    return;
  }
  try {
    await api("POST", "/api/admin/users", { email, password, role });
    form.reset();
    panelNotice("users", `Created ${email} (${role}).`, "info");
  } catch (error) {
    handleFailure("users", error);
    return;
  }
  await loadUsers();
});

// ---- usage ------------------------------------------------------------------------------------

async function loadUsage() {
  const days = $("#usage-days").value;
  let rows;
  try {
    rows = await api("GET", `/api/admin/usage?days=${encodeURIComponent(days)}`);
  } catch (error) {
    handleFailure("usage", error);
    return;
  }
  panelNotice("usage", "");
  const detailTable = $("#usage-table");
  const detailBody = clear($("tbody", detailTable));
  const perUser = new Map();
  const sortedRows = [...rows].sort((a, b) => String(b.day).localeCompare(String(a.day)) || a.email.localeCompare(b.email));
  for (const row of sortedRows) {
    detailBody.append(
      h(
        "tr",
        { dataset: { userEmail: row.email } },
        cell(row.day),
        cell(row.email),
        cell(formatNumber(row.requests), "num"),
        cell(formatNumber(row.prompt_tokens), "num"),
        cell(formatNumber(row.completion_tokens), "num"),
      ),
    );
    const total = perUser.get(row.email) ?? { requests: 0, prompt_tokens: 0, completion_tokens: 0 };
    total.requests += Number(row.requests) || 0;
    total.prompt_tokens += Number(row.prompt_tokens) || 0;
    total.completion_tokens += Number(row.completion_tokens) || 0;
    perUser.set(row.email, total);
  }
  if (rows.length === 0) emptyRow(detailTable, 5, "No usage in this period.");

  const totalsTable = $("#usage-totals-table");
  const totalsBody = clear($("tbody", totalsTable));
  const grand = { requests: 0, prompt_tokens: 0, completion_tokens: 0 };
  const byRequests = [...perUser.entries()].sort((a, b) => b[1].completion_tokens - a[1].completion_tokens);
  for (const [email, total] of byRequests) {
    for (const key of Object.keys(grand)) grand[key] += total[key];
    totalsBody.append(
      h(
        "tr",
        { dataset: { userEmail: email } },
        cell(email),
        cell(formatNumber(total.requests), "num"),
        cell(formatNumber(total.prompt_tokens), "num"),
        cell(formatNumber(total.completion_tokens), "num"),
      ),
    );
  }
  if (perUser.size === 0) emptyRow(totalsTable, 4, "No usage in this period.");
  clear($("tfoot", totalsTable)).append(
    h(
      "tr",
      {},
      cell("All users"),
      cell(formatNumber(grand.requests), "num"),
      cell(formatNumber(grand.prompt_tokens), "num"),
      cell(formatNumber(grand.completion_tokens), "num"),
    ),
  );
}

$("#usage-days").addEventListener("change", loadUsage);

// ---- audit ------------------------------------------------------------------------------------

function auditDetail(detail) {
  if (detail === null || detail === undefined || detail === "") return "";
  return typeof detail === "string" ? detail : JSON.stringify(detail);
}

async function loadAudit() {
  let result;
  try {
    result = await api("GET", `/api/admin/audit?page=${state.auditPage}&page_size=${AUDIT_PAGE_SIZE}`);
  } catch (error) {
    handleFailure("audit", error);
    return;
  }
  panelNotice("audit", "");
  const table = $("#audit-table");
  const body = clear($("tbody", table));
  for (const item of result.items) {
    body.append(
      h(
        "tr",
        { dataset: { action: item.action } },
        cell(h("time", { datetime: item.ts }, formatDateTime(item.ts))),
        cell(item.actor_email ?? "—"),
        cell(h("code", {}, item.action)),
        cell(item.target ?? ""),
        cell(item.address ?? ""),
        cell(auditDetail(item.detail), "wrap"),
      ),
    );
  }
  if (result.items.length === 0) emptyRow(table, 6, "No entries.");
  const pageSize = result.page_size || AUDIT_PAGE_SIZE;
  state.auditPages = Math.max(1, Math.ceil((result.total ?? 0) / pageSize));
  state.auditPage = result.page ?? state.auditPage;
  $("#audit-page").textContent = `Page ${state.auditPage} of ${state.auditPages}`;
  $("#audit-summary").textContent = `${formatNumber(result.total ?? 0)} entries, newest first`;
  $("#audit-prev").disabled = state.auditPage <= 1;
  $("#audit-next").disabled = state.auditPage >= state.auditPages;
}

$("#audit-prev").addEventListener("click", () => {
  state.auditPage = Math.max(1, state.auditPage - 1);
  loadAudit();
});
$("#audit-next").addEventListener("click", () => {
  state.auditPage = Math.min(state.auditPages, state.auditPage + 1);
  loadAudit();
});

// ---- API keys ---------------------------------------------------------------------------------

async function loadKeys() {
  let keys;
  try {
    keys = await api("GET", "/api/admin/api-keys");
  } catch (error) {
    handleFailure("keys", error);
    return;
  }
  const table = $("#keys-table");
  const body = clear($("tbody", table));
  for (const key of keys) {
    body.append(
      h(
        "tr",
        {},
        cell(key.email),
        cell(key.name),
        cell(h("code", {}, `${key.prefix}…`)),
        cell(formatDateTime(key.created_at)),
        cell(key.last_used_at ? formatRelative(key.last_used_at) : "never"),
        cell(
          h(
            "span",
            { class: `badge badge--${key.revoked_at || keyExpired(key) ? "disabled" : "active"}` },
            key.revoked_at ? "revoked" : keyExpired(key) ? "expired" : "active",
          ),
        ),
        cell(
          key.revoked_at
            ? ""
            : h(
                "div",
                { class: "row-actions" },
                h(
                  "button",
                  {
                    class: "btn btn--small btn--danger",
                    type: "button",
                    "aria-label": `Revoke the key ${key.name} of ${key.email}`,
                    onclick: () => revokeKey(key),
                  },
                  "Revoke",
                ),
                h(
                  "button",
                  {
                    class: "btn btn--small",
                    type: "button",
                    "aria-label": `Limits of the key ${key.name} of ${key.email}`,
                    title: key.expires_at ? `Expires ${formatDateTime(key.expires_at)}` : null,
                    onclick: () =>
                      openLimitsDialog("key", key, () => {
                        panelNotice("keys", `Saved the limits of “${key.name}”.`, "info");
                        loadKeys();
                      }),
                  },
                  "Limits",
                ),
              ),
        ),
      ),
    );
  }
  if (keys.length === 0) emptyRow(table, 7, "No API keys.");
}

function keyExpired(key) {
  return Boolean(key.expires_at) && new Date(key.expires_at).getTime() <= Date.now();
}

async function revokeKey(key) {
  const confirmed = await confirmDialog({
    title: `Revoke “${key.name}”?`,
    message: `Clients using this key of ${key.email} will be refused from now on.`,
    confirmLabel: "Revoke",
    danger: true,
  });
  if (!confirmed) return;
  try {
    await api("DELETE", `/api/admin/api-keys/${key.id}`);
    panelNotice("keys", `Revoked “${key.name}”.`, "info");
  } catch (error) {
    handleFailure("keys", error);
  }
  await loadKeys();
}

// ---- start-up ---------------------------------------------------------------------------------

function enter(user) {
  state.user = user;
  if (user.role !== "admin") {
    showRefused(user);
    return;
  }
  ui.userEmail.textContent = user.email;
  showView("admin");
  selectPanel(window.location.hash.slice(1) || "system");
}

async function boot() {
  showView("boot");
  ui.bootRetry.hidden = true;
  try {
    const user = await currentUser();
    if (user) enter(user);
    else showLogin();
  } catch (error) {
    ui.bootMessage.textContent = describeError(error);
    ui.bootRetry.hidden = false;
  }
}

async function logout() {
  await signOut();
  showLogin();
}

ui.bootRetry.addEventListener("click", boot);
$("#logout").addEventListener("click", logout);
$("#refused-logout").addEventListener("click", logout);
window.addEventListener("zeus:unauthorized", () => {
  if (state.user) showLogin("Your session has ended. Please sign in again.");
});
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && state.panel === "system" && !ui.adminView.hidden) refreshSystem();
});

decorateIcons();
boot();
