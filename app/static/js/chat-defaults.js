// The admin dashboard's "Chat defaults" form: the system prompt new conversations start with
// (GET /api/conversations/defaults, PUT /api/admin/chat-defaults). It loads when it comes into
// view, so it reads the value only once the admin is signed in.

import { api, describeError } from "./api.js";
import { $ } from "./dom.js";

const form = $("#chat-defaults");
const prompt = $("#default-system-prompt");
const status = $("#chat-defaults-status");

async function load() {
  try {
    prompt.value = (await api("GET", "/api/conversations/defaults")).default_system_prompt ?? "";
    status.textContent = "";
  } catch (error) {
    status.textContent = `Not loaded: ${describeError(error)}`;
  }
}

new IntersectionObserver((entries) => {
  if (entries.some((entry) => entry.isIntersecting)) load();
}).observe(form);

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    await api("PUT", "/api/admin/chat-defaults", { default_system_prompt: prompt.value });
    status.textContent = "Saved: new conversations start with this prompt.";
  } catch (error) {
    status.textContent = `Not saved: ${describeError(error)}`;
  }
});
