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

// Directory accounts first; a local account (e.g. the admin made with `python -m app create-user`)
// when the directory does not know the name and local passwords are allowed.
async function directoryLogin(methods, username, password) {
  try {
    return await api("POST", "/api/auth/ldap/login", { username, password });
  } catch (error) {
    if (error.status !== 401 || !methods.password || !username.includes("@")) throw error;
    return await api("POST", "/api/auth/login", { email: username, password });
  }
}

function loginErrorMessage(error, methods) {
  if (error.status === 401) return methods.ldap ? "Wrong username or password." : "Wrong email or password.";
  if (error.status === 403) return error.detail || "This account is disabled. Ask an administrator.";
  if (error.status === 422) return "Enter a valid email address and a password.";
  return describeError(error);
}

// What the single sign-on callback sent back with the browser (?sso_error=...), taken out of the
// address so that a reload does not show it again.
function takeSsoError() {
  const url = new URL(window.location.href);
  const message = url.searchParams.get("sso_error") || "";
  if (message) {
    url.searchParams.delete("sso_error");
    window.history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
  return message;
}

async function signInMethods() {
  try {
    return await api("GET", "/api/auth/providers");
  } catch {
    // An older server without single sign-on, or no answer yet: the password form still works.
    return { password: true, ldap: false, oidc: null };
  }
}

/** Shows the sign-in methods the server offers: the password form (for local or directory
 * accounts) and a "Sign in with NAME" button for OpenID Connect. */
function showSignInMethods(form, methods) {
  const usesForm = methods.password || methods.ldap;
  for (const element of form.querySelectorAll(".field, button[type=submit]")) element.hidden = !usesForm;
  if (methods.ldap) {
    // Directory accounts sign in with their username (or email, as the directory allows).
    const email = form.elements.email;
    email.type = "text";
    const label = form.querySelector(`label[for="${email.id}"]`);
    label.textContent = methods.password ? "Username or email" : "Username";
  }
  if (!methods.oidc || form.querySelector("#sso-login")) return;
  const button = document.createElement("a");
  button.id = "sso-login";
  button.className = usesForm ? "btn sso-login" : "btn btn--primary sso-login";
  // Back to this page (chat or admin) once signed in.
  button.href = `${methods.oidc.login_url}?next=${encodeURIComponent(window.location.pathname)}`;
  button.textContent = `Sign in with ${methods.oidc.name}`;
  form.append(button);
}

/** Wires a sign-in form (fields named email and password) to POST /api/auth/login, or to
 * POST /api/auth/ldap/login when the server signs in against a directory. */
export function setupLoginForm(form, errorBox, onSignedIn) {
  let ssoError = takeSsoError();
  const setError = (text) => {
    errorBox.textContent = text;
    errorBox.hidden = !text;
  };
  // The pages clear the box when they show the sign-in view: a refused single sign-on stays shown.
  const showError = (text) => {
    setError(text || ssoError);
    ssoError = "";
  };
  setError(ssoError);
  let methods = { password: true, ldap: false, oidc: null };
  signInMethods().then((found) => {
    methods = found;
    showSignInMethods(form, methods);
  });
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
      const user = methods.ldap
        ? await directoryLogin(methods, email, password)
        : await api("POST", "/api/auth/login", { email, password });
      form.reset();
      await onSignedIn(user);
    } catch (error) {
      showError(loginErrorMessage(error, methods));
      form.elements.password.select();
    } finally {
      button.disabled = false;
    }
  });
  return { showError };
}
