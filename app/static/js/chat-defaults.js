// The admin dashboard's "Chat defaults" form: the system prompt new conversations start with
// (GET /api/conversations/defaults, PUT /api/admin/chat-defaults). It loads when it comes into
// view, so it reads the value only once the admin is signed in, and again each time its panel is
// shown (another admin may have changed it). A load never replaces what the admin has typed and
// not saved: a reply that arrived after the typing put the stored value back into the field, and
// "Save" then saved that instead (seen in the browser tests).

import { api, describeError } from "./api.js";
import { $ } from "./dom.js";

const form = $("#chat-defaults");
const prompt = $("#default-system-prompt");
const status = $("#chat-defaults-status");
let edited = false;

async function load() {
  if (edited) return;
  try {
    const stored = (await api("GET", "/api/conversations/defaults")).default_system_prompt ?? "";
    if (edited) return;
    prompt.value = stored;
    status.textContent = "";
  } catch (error) {
    status.textContent = `Not loaded: ${describeError(error)}`;
  }
}

prompt.addEventListener("input", () => {
  edited = true;
});

new IntersectionObserver((entries) => {
  if (entries.some((entry) => entry.isIntersecting)) load();
}).observe(form);

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const saving = prompt.value;
  try {
    await api("PUT", "/api/admin/chat-defaults", { default_system_prompt: saving });
    // Typing while the save was on its way is still unsaved.
    if (prompt.value === saving) edited = false;
    status.textContent = "Saved: new conversations start with this prompt.";
  } catch (error) {
    status.textContent = `Not saved: ${describeError(error)}`;
  }
});
