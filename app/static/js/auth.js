// Sign-in, sign-out and "who am I", shared by the chat page and the admin dashboard.

import { api, describeError } from "./api.js";

export async function currentUser() {
  try {
    return await api("GET", "/api/auth/me");
  } catch (error) {
    if (error.status === 401) return null;
    throw error;
  }
}

export async function signOut() {
  try {
    await api("POST", "/api/auth/logout");
  } catch {
    // The cookie may already be gone; the page returns to the sign-in form either way.
  }
}

function loginErrorMessage(error) {
  if (error.status === 401) return "Wrong email or password.";
  if (error.status === 403) return error.detail || "This account is disabled. Ask an administrator.";
  if (error.status === 422) return "Enter a valid email address and a password.";
  return describeError(error);
}

/** Wires a sign-in form (fields named email and password) to POST /api/auth/login. */
export function setupLoginForm(form, errorBox, onSignedIn) {
  const showError = (text) => {
    errorBox.textContent = text;
    errorBox.hidden = !text;
  };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const email = form.elements.email.value.trim();
    const password = form.elements.password.value;
    if (!email || !password) {
      showError("Enter your email and your password.");
      (email ? form.elements.password : form.elements.email).focus();
      return;
    }
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    showError("");
    try {
      const user = await api("POST", "/api/auth/login", { email, password });
      form.reset();
      await onSignedIn(user);
    } catch (error) {
      showError(loginErrorMessage(error));
      form.elements.password.select();
    } finally {
      button.disabled = false;
    }
  });
  return { showError };
}
