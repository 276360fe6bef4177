// The account page: change one's own password (POST /api/auth/password) and manage one's own API
// keys (GET/POST /api/keys, DELETE /api/keys/{id}). Not signed in: back to the chat page's sign-in.

import { api, describeError } from "./api.js";
import { currentUser, signOut } from "./auth.js";
import { $, confirmDialog, formatDateTime, formatRelative, h } from "./dom.js";
import { copyButton } from "./markdown.js";

const ui = {
  bootView: $("#boot-view"),
  bootMessage: $("#boot-message"),
  accountView: $("#account-view"),
  userEmail: $("#user-email"),
  logout: $("#logout"),
  passwordForm: $("#password-form"),
  passwordMessage: $("#password-message"),
  currentPassword: $("#current-password"),
  newPassword: $("#new-password"),
  repeatPassword: $("#repeat-password"),
  keyForm: $("#key-form"),
  keyName: $("#key-name"),
  keyCreated: $("#key-created"),
  keySecret: $("#key-secret"),
  keysError: $("#keys-error"),
  keysBody: $("#keys-table tbody"),
};

function showPasswordMessage(kind, text) {
  ui.passwordMessage.className = `notice notice--${kind}`;
  ui.passwordMessage.textContent = text;
  ui.passwordMessage.hidden = false;
}

async function changePassword() {
  const current = ui.currentPassword.value;
  const next = ui.newPassword.value;
  if (!current) return showPasswordMessage("error", "Enter your current password.");
  if (next.length < 8) return showPasswordMessage("error", "The new password needs at least 8 characters.");
  if (next !== ui.repeatPassword.value) return showPasswordMessage("error", "The two new passwords differ.");
  try {
    await api("POST", "/api/auth/password", { current_password: current, new_password: next });
  } catch (error) {
    showPasswordMessage("error", `Password not changed: ${describeError(error)}`);
    return;
  }
  ui.passwordForm.reset();
  showPasswordMessage("ok", "Password changed. Your other sessions have been signed out.");
}

async function loadKeys() {
  let keys;
  try {
    keys = await api("GET", "/api/keys");
  } catch (error) {
    ui.keysError.textContent = describeError(error);
    ui.keysError.hidden = false;
    return;
  }
  ui.keysError.hidden = true;
  ui.keysBody.replaceChildren(
    ...keys.map((key) =>
      h(
        "tr",
        { dataset: { keyId: key.id } },
        h("td", {}, key.name),
        h("td", {}, h("code", {}, `${key.prefix}…`)),
        h("td", {}, formatDateTime(key.created_at)),
        h("td", { title: key.last_used_at ? formatDateTime(key.last_used_at) : "" }, formatRelative(key.last_used_at)),
        h("td", {}, key.revoked_at ? `Revoked ${formatRelative(key.revoked_at)}` : "Active"),
        h(
          "td",
          {},
          key.revoked_at
            ? ""
            : h(
                "button",
                {
                  class: "btn btn--small btn--danger",
                  type: "button",
                  "aria-label": `Revoke “${key.name}”`,
                  onclick: () => revokeKey(key),
                },
                "Revoke",
              ),
        ),
      ),
    ),
  );
  if (keys.length === 0) {
    ui.keysBody.append(h("tr", {}, h("td", { colspan: 6, class: "empty-hint" }, "No API keys yet.")));
  }
}

async function createKey() {
  const name = ui.keyName.value.trim();
  if (!name) {
    ui.keysError.textContent = "Give the key a name, so you can tell your keys apart.";
    ui.keysError.hidden = false;
    return;
  }
  try {
    const created = await api("POST", "/api/keys", { name });
    ui.keySecret.textContent = created.key;
    ui.keyCreated.querySelector("button")?.remove();
    ui.keyCreated.append(copyButton("Copy the new key", () => created.key));
    ui.keyCreated.hidden = false;
    ui.keyForm.reset();
  } catch (error) {
    ui.keysError.textContent = `Key not created: ${describeError(error)}`;
    ui.keysError.hidden = false;
    return;
  }
  await loadKeys();
}

async function revokeKey(key) {
  const confirmed = await confirmDialog({
    title: "Revoke this API key?",
    message: `Programs using “${key.name}” (${key.prefix}…) will be refused from now on. This cannot be undone.`,
    confirmLabel: "Revoke",
    danger: true,
  });
  if (!confirmed) return;
  try {
    await api("DELETE", `/api/keys/${key.id}`);
  } catch (error) {
    ui.keysError.textContent = `Key not revoked: ${describeError(error)}`;
    ui.keysError.hidden = false;
  }
  await loadKeys();
}

async function boot() {
  let user;
  try {
    user = await currentUser();
  } catch (error) {
    ui.bootMessage.textContent = describeError(error);
    return;
  }
  if (!user) {
    window.location.replace("/");
    return;
  }
  ui.userEmail.textContent = user.email;
  ui.bootView.hidden = true;
  ui.accountView.hidden = false;
  await loadKeys();
}

ui.passwordForm.addEventListener("submit", (event) => {
  event.preventDefault();
  changePassword();
});
ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  createKey();
});
ui.logout.addEventListener("click", async () => {
  await signOut();
  window.location.replace("/");
});
window.addEventListener("zeus:unauthorized", () => window.location.replace("/"));

boot();
