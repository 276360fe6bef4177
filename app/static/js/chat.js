// The chat page: conversations, streaming replies (SSE over fetch), stop, regenerate any reply,
// edit and resend, per-conversation settings, search, export, and the model's memory marker.

import { ApiError, api, describeError, send } from "./api.js";
import { currentUser, setupLoginForm, signOut } from "./auth.js";
import { $, clear, confirmDialog, formatRelative, h } from "./dom.js";
import { decorateIcons, icon } from "./icons.js";
import { copyButton, createReplyRenderer, renderMarkdown } from "./markdown.js";
import { readServerSentEvents } from "./sse.js";

const STATUS_LABELS = {
  streaming: "Generating…",
  stopped: "Stopped",
  interrupted: "Interrupted",
  error: "Error",
};
const TITLE_LENGTH = 60;
const RENDER_INTERVAL_MS = 40;
const POLL_INTERVAL_MS = 2000;
const SEARCH_DELAY_MS = 250;
// Search snippets mark the matched words with these (see SearchMatch in app/api/schemas.py).
const MATCH_START = "\u0002";
const MATCH_END = "\u0003";

const state = {
  user: null,
  conversations: [],
  currentId: null,
  // The stream this page is reading: {controller, conversationId, stopRequested}.
  stream: null,
  pollTimer: null,
  noticeTimer: null,
  searchTimer: null,
  // Settings chosen before the first message of a new conversation (sent when it is created).
  draftSettings: null,
  defaultSystemPrompt: "",
};

const ui = {
  bootView: $("#boot-view"),
  bootMessage: $("#boot-message"),
  bootRetry: $("#boot-retry"),
  loginView: $("#login-view"),
  loginForm: $("#login-form"),
  loginError: $("#login-error"),
  chatView: $("#chat-view"),
  userEmail: $("#user-email"),
  adminLink: $("#admin-link"),
  logout: $("#logout"),
  sidebar: $("#sidebar"),
  toggleSidebar: $("#toggle-sidebar"),
  newChat: $("#new-chat"),
  conversationList: $("#conversation-list"),
  conversationTitle: $("#conversation-title"),
  messages: $("#messages"),
  messagesInner: $("#messages-inner"),
  notice: $("#notice"),
  noticeText: $("#notice-text"),
  noticeAction: $("#notice-action"),
  noticeClose: $("#notice-close"),
  composer: $("#composer"),
  prompt: $("#prompt"),
  send: $("#send"),
  stop: $("#stop"),
  regenerate: $("#regenerate"),
  search: $("#search"),
  searchForm: $("#search-form"),
  searchResults: $("#search-results"),
  deleteAll: $("#delete-all"),
  exportMarkdown: $("#export-markdown"),
  exportJson: $("#export-json"),
  settingsToggle: $("#settings-toggle"),
  settingsPanel: $("#settings-panel"),
  settingsCancel: $("#settings-cancel"),
  settingsStatus: $("#settings-status"),
  systemPrompt: $("#system-prompt"),
  temperature: $("#temperature"),
  maxTokens: $("#max-tokens"),
};

const login = setupLoginForm(ui.loginForm, ui.loginError, (user) => enterChat(user));

function showView(name) {
  ui.bootView.hidden = name !== "boot";
  ui.loginView.hidden = name !== "login";
  ui.chatView.hidden = name !== "chat";
}

function showLogin(message = "") {
  abortStream();
  stopPolling();
  state.user = null;
  state.conversations = [];
  state.currentId = null;
  login.showError(message);
  showView("login");
  $("#login-email").focus();
}

// Notices sit above the composer: one at a time, with at most one action (retry, reload).
function showNotice({ kind = "error", text, actionLabel = null, action = null, countdownS = 0 }) {
  clearInterval(state.noticeTimer);
  ui.notice.className = `notice notice--${kind}`;
  ui.noticeText.textContent = text;
  ui.noticeAction.hidden = !action;
  ui.noticeAction.onclick = null;
  if (action) {
    ui.noticeAction.onclick = () => {
      hideNotice();
      action();
    };
    let remaining = countdownS;
    const tick = () => {
      ui.noticeAction.disabled = remaining > 0;
      ui.noticeAction.textContent = remaining > 0 ? `${actionLabel} in ${remaining} s` : actionLabel;
      remaining -= 1;
      if (remaining < 0) clearInterval(state.noticeTimer);
    };
    tick();
    if (countdownS > 0) state.noticeTimer = setInterval(tick, 1000);
  }
  ui.notice.hidden = false;
}

function hideNotice() {
  clearInterval(state.noticeTimer);
  ui.notice.hidden = true;
}

/** Explains a refused or failed request and offers the matching way out. */
function showRequestError(error, retry) {
  if (error.status === 401) return; // the unauthorized handler shows the sign-in form
  if (error.status === 429) {
    const wait = error.retryAfterS ?? 5;
    showNotice({
      kind: "warning",
      text: `Zeus is busy right now${error.detail ? `: ${error.detail.replace(/\.$/, "")}` : ""}. Retry in ${wait} s.`,
      actionLabel: "Retry",
      action: retry,
      countdownS: wait,
    });
  } else if (error.status === 400) {
    showNotice({ kind: "error", text: `Message not sent: ${error.detail}` });
  } else if (error.status === 404) {
    showNotice({ kind: "error", text: "This conversation no longer exists." });
    loadConversations().then(() => showDraft());
  } else if (error.status === 0) {
    showNotice({
      kind: "error",
      text: "Lost connection to the server. Check your network, then retry.",
      actionLabel: "Retry",
      action: retry,
    });
  } else {
    showNotice({ kind: "error", text: describeError(error), actionLabel: retry ? "Retry" : null, action: retry });
  }
}

// ---- conversations --------------------------------------------------------------------------

function conversationHashId() {
  const match = /^#c\/(.+)$/.exec(window.location.hash);
  return match ? decodeURIComponent(match[1]) : null;
}

function setConversationHash(id) {
  const hash = id === null ? "" : `#c/${encodeURIComponent(id)}`;
  if (window.location.hash !== hash) {
    window.history.pushState(null, "", hash || window.location.pathname);
  }
}

function findConversation(id) {
  return state.conversations.find((conversation) => String(conversation.id) === String(id));
}

async function loadConversations() {
  try {
    const loaded = await api("GET", "/api/conversations");
    // A conversation created while this list was on its way is not in it yet: keep it.
    const current = state.stream ? findConversation(state.stream.conversationId) : null;
    if (current && !loaded.some((conversation) => String(conversation.id) === String(current.id))) {
      loaded.unshift(current);
    }
    state.conversations = loaded;
  } catch (error) {
    showRequestError(error, () => loadConversations());
  }
  renderConversationList();
}

function renderConversationList() {
  clear(ui.conversationList);
  if (state.conversations.length === 0) {
    ui.conversationList.append(h("li", { class: "empty-hint" }, "No conversations yet."));
    return;
  }
  for (const conversation of state.conversations) {
    const current = String(conversation.id) === String(state.currentId);
    const title = conversation.title || "Untitled";
    const item = h(
      "li",
      { class: "conversation", dataset: { conversationId: conversation.id, current: String(current) } },
      h(
        "button",
        {
          class: "conversation__open",
          type: "button",
          "aria-current": current ? "page" : null,
          onclick: () => openConversation(conversation.id),
        },
        h("span", { class: "conversation__title" }, title),
        h("span", { class: "conversation__date" }, formatRelative(conversation.updated_at ?? conversation.created_at)),
      ),
      h(
        "span",
        { class: "conversation__actions" },
        h(
          "button",
          {
            class: "btn btn--ghost btn--icon",
            type: "button",
            title: "Rename",
            "aria-label": `Rename “${title}”`,
            onclick: () => startRename(conversation, item),
          },
          icon("pencil"),
        ),
        h(
          "button",
          {
            class: "btn btn--ghost btn--icon",
            type: "button",
            title: "Delete",
            "aria-label": `Delete “${title}”`,
            onclick: () => deleteConversation(conversation),
          },
          icon("trash"),
        ),
      ),
    );
    ui.conversationList.append(item);
  }
}

function startRename(conversation, item) {
  const input = h("input", {
    value: conversation.title ?? "",
    maxlength: 200,
    "aria-label": "New title",
    required: true,
  });
  const cancel = () => renderConversationList();
  const form = h(
    "form",
    {
      class: "conversation__rename",
      onsubmit: async (event) => {
        event.preventDefault();
        const title = input.value.trim();
        if (!title) {
          showNotice({ kind: "error", text: "A conversation title cannot be empty." });
          input.focus();
          return;
        }
        try {
          const updated = await api("PATCH", `/api/conversations/${conversation.id}`, { title });
          Object.assign(conversation, updated);
          hideNotice();
          if (String(conversation.id) === String(state.currentId)) ui.conversationTitle.textContent = title;
        } catch (error) {
          showRequestError(error, null);
        }
        renderConversationList();
      },
    },
    input,
    h("button", { class: "btn btn--small btn--primary", type: "submit" }, "Save"),
  );
  input.addEventListener("keydown", (event) => {
    if (event.key === "Escape") cancel();
  });
  item.replaceChildren(form);
  input.focus();
  input.select();
}

async function deleteConversation(conversation) {
  const confirmed = await confirmDialog({
    title: "Delete this conversation?",
    message: `“${conversation.title || "Untitled"}” and all its messages will be deleted. This cannot be undone.`,
    confirmLabel: "Delete",
    danger: true,
  });
  if (!confirmed) return;
  try {
    if (state.stream && String(state.stream.conversationId) === String(conversation.id)) await stopGeneration();
    await api("DELETE", `/api/conversations/${conversation.id}`);
  } catch (error) {
    if (error.status !== 404) {
      showRequestError(error, null);
      return;
    }
  }
  state.conversations = state.conversations.filter((item) => item !== conversation);
  if (String(conversation.id) === String(state.currentId)) showDraft();
  renderConversationList();
}

function closeSidebarOnNarrow() {
  ui.sidebar.dataset.open = "false";
  ui.toggleSidebar.setAttribute("aria-expanded", "false");
}

/** An empty page for a new conversation; it is created on the server with the first message. */
function showDraft() {
  if (state.stream) stopGeneration();
  stopPolling();
  state.currentId = null;
  state.draftSettings = null;
  setConversationHash(null);
  ui.conversationTitle.textContent = "New chat";
  updateConversationTools();
  renderMessages([]);
  renderConversationList();
  closeSidebarOnNarrow();
  ui.prompt.focus();
}

async function openConversation(id, { pushHistory = true } = {}) {
  if (state.stream && String(state.stream.conversationId) !== String(id)) await stopGeneration();
  hideNotice();
  stopPolling();
  state.currentId = id;
  if (pushHistory) setConversationHash(id);
  ui.conversationTitle.textContent = findConversation(id)?.title || "Untitled";
  updateConversationTools();
  renderConversationList();
  closeSidebarOnNarrow();
  await loadMessages(id);
}

async function loadMessages(id) {
  let messages;
  try {
    messages = await api("GET", `/api/conversations/${id}/messages`);
  } catch (error) {
    showRequestError(error, () => loadMessages(id));
    return;
  }
  if (String(id) !== String(state.currentId)) return;
  // The reply streaming into this view is newer than what the server had stored when asked.
  if (state.stream && String(state.stream.conversationId) === String(id)) return;
  renderMessages(messages);
  drawMemoryMarker();
  // Another tab (or a reload mid-reply) may still be generating: follow it until it settles.
  if (messages.some((message) => message.status === "streaming")) {
    state.pollTimer = setTimeout(() => loadMessages(id), POLL_INTERVAL_MS);
  }
}

function stopPolling() {
  clearTimeout(state.pollTimer);
  state.pollTimer = null;
}

// ---- messages -------------------------------------------------------------------------------

function isNearBottom() {
  const { scrollTop, scrollHeight, clientHeight } = ui.messages;
  return scrollHeight - scrollTop - clientHeight < 120;
}

function scrollToBottom() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function renderMessages(messages) {
  clear(ui.messagesInner);
  if (messages.length === 0) {
    ui.messagesInner.append(
      h(
        "div",
        { class: "welcome" },
        h("h2", {}, "What can I help with?"),
        h("p", {}, "Ask a question, paste some code, or draft a text. Replies stream in as they are written."),
      ),
    );
  }
  for (const message of messages) ui.messagesInner.append(messageElement(message));
  scrollToBottom();
  updateComposer();
}

function messageElement(message) {
  const isUser = message.role === "user";
  const body = h("div", { class: isUser ? "message__body" : "message__body markdown" });
  if (isUser) body.textContent = message.content;
  else body.append(renderMarkdown(message.content));
  // The raw text, for Copy and Edit (the body shows it rendered).
  const source = { text: message.content };
  const article = h(
    "article",
    {
      class: `message message--${isUser ? "user" : "assistant"}`,
      dataset: { role: message.role, status: message.status ?? "complete" },
      "aria-label": isUser ? "Your message" : "Reply from Zeus",
    },
    h("div", { class: "message__meta" }, h("span", { class: "message__author" }, isUser ? "You" : "Zeus")),
    body,
  );
  article.zeusSource = source;
  article.append(messageActions(article, isUser));
  if (message.id !== undefined) article.dataset.messageId = message.id;
  if (!isUser) {
    setMessageStatus(article, message.status ?? "complete");
    if (message.completion_tokens) setMessageStats(article, { completion_tokens: message.completion_tokens });
  }
  return article;
}

function setMessageStatus(article, status, errorText = null) {
  article.dataset.status = status;
  const meta = article.querySelector(".message__meta");
  meta.querySelector(".badge")?.remove();
  const label = STATUS_LABELS[status];
  if (label) meta.append(h("span", { class: `badge badge--${status}`, "data-status-label": status }, label));
  article.querySelector(".message__error")?.remove();
  if (errorText) article.append(h("p", { class: "message__error" }, errorText));
  if (status === "error" && !errorText && !article.querySelector(".message__body").textContent) {
    article.append(h("p", { class: "message__error" }, "The reply failed. Use Regenerate to try again."));
  }
}

function setMessageStats(article, { completion_tokens: tokens, duration_ms: durationMs }) {
  const meta = article.querySelector(".message__meta");
  meta.querySelector(".message__stats")?.remove();
  const parts = [`${tokens} tokens`];
  if (durationMs) parts.push(`${(durationMs / 1000).toFixed(1)} s`);
  meta.append(h("span", { class: "message__stats" }, parts.join(" · ")));
}

function messageActions(article, isUser) {
  const actions = h("div", { class: "message__actions" });
  if (isUser) {
    actions.append(
      h(
        "button",
        { class: "btn btn--ghost btn--small", type: "button", "aria-label": "Edit message", onclick: () => startEdit(article) },
        icon("pencil"),
        "Edit",
      ),
    );
  } else {
    actions.append(
      copyButton("Copy reply", () => article.zeusSource.text, "btn btn--ghost btn--small"),
      h(
        "button",
        {
          class: "btn btn--ghost btn--small",
          type: "button",
          "aria-label": "Regenerate this reply",
          onclick: () => regenerate(article),
        },
        icon("refresh"),
        "Regenerate",
      ),
    );
  }
  return actions;
}

/** The messages after `article` on the page (the turns an edit or a regeneration replaces). */
function laterMessages(article) {
  const all = [...ui.messagesInner.querySelectorAll(".message")];
  return all.slice(all.indexOf(article) + 1);
}

async function confirmReplacing(article, what) {
  const later = laterMessages(article).filter((item) => item.dataset.role === "user").length;
  const replaced = laterMessages(article).length;
  if (replaced === 0 || (what === "regenerate" && later === 0)) return true;
  return confirmDialog({
    title: what === "edit" ? "Edit and resend this message?" : "Regenerate this reply?",
    message:
      `The ${replaced} message${replaced === 1 ? "" : "s"} after it will be deleted and replaced by the new reply. ` +
      "This cannot be undone.",
    confirmLabel: what === "edit" ? "Replace and resend" : "Replace and regenerate",
    danger: true,
  });
}

function startEdit(article) {
  if (state.stream || !article.dataset.messageId) return;
  const body = article.querySelector(".message__body");
  const input = h("textarea", { class: "message__edit-input", "aria-label": "Edited message", rows: 3 });
  input.value = article.zeusSource.text;
  const restore = () => {
    form.remove();
    body.hidden = false;
  };
  const form = h(
    "form",
    {
      class: "message__edit",
      onsubmit: async (event) => {
        event.preventDefault();
        const content = input.value;
        if (!content.trim()) return;
        if (!(await confirmReplacing(article, "edit"))) return;
        restore();
        await resendEdited(article, content);
      },
    },
    input,
    h(
      "div",
      { class: "message__edit-actions" },
      h("button", { class: "btn btn--small", type: "button", onclick: restore }, "Cancel"),
      h("button", { class: "btn btn--small btn--primary", type: "submit" }, "Save and resend"),
    ),
  );
  input.addEventListener("keydown", (event) => {
    if (event.key === "Escape") restore();
  });
  body.hidden = true;
  body.after(form);
  input.focus();
}

async function resendEdited(article, content) {
  hideNotice();
  const later = laterMessages(article);
  const body = article.querySelector(".message__body");
  const previous = article.zeusSource.text;
  for (const item of later) item.hidden = true;
  body.textContent = content;
  article.zeusSource.text = content;
  const reply = messageElement({ role: "assistant", content: "", status: "streaming" });
  ui.messagesInner.append(reply);
  scrollToBottom();
  const ok = await streamReply({
    conversationId: state.currentId,
    path: `/api/conversations/${state.currentId}/messages/${article.dataset.messageId}`,
    method: "PUT",
    body: { content },
    reply,
    replaced: later,
    retry: () => resendEdited(article, content),
  });
  if (!ok) {
    body.textContent = previous;
    article.zeusSource.text = previous;
  }
}

/** Re-renders a growing reply at most every RENDER_INTERVAL_MS; finished blocks stay as drawn. */
function replyRenderer(article) {
  const body = article.querySelector(".message__body");
  const markdown = createReplyRenderer(body);
  let timer = null;
  let latest = "";
  let lastDrawn = 0;
  const draw = (streaming) => {
    const follow = isNearBottom();
    if (streaming) markdown.update(latest);
    else markdown.finish(latest);
    article.zeusSource.text = latest;
    lastDrawn = performance.now();
    if (follow) scrollToBottom();
  };
  return {
    update(text) {
      latest = text;
      if (timer !== null) return;
      const wait = Math.max(0, RENDER_INTERVAL_MS - (performance.now() - lastDrawn));
      timer = setTimeout(() => {
        timer = null;
        draw(true);
      }, wait);
    },
    finish(text) {
      clearTimeout(timer);
      timer = null;
      latest = text;
      draw(false);
    },
  };
}

function parseEventData(data) {
  try {
    return JSON.parse(data);
  } catch {
    return {};
  }
}

/**
 * Posts to a streaming endpoint and renders the reply into `reply` as it arrives.
 * `pending` are elements shown optimistically; they are removed again if the server refuses
 * before streaming (429, 400, ...). `replaced` is the old reply that Regenerate hides.
 */
async function streamReply({
  conversationId,
  path,
  method = "POST",
  body,
  reply,
  pending = [],
  replaced = [],
  retry,
  draft = null,
}) {
  const controller = new AbortController();
  const stream = { controller, conversationId, stopRequested: false };
  state.stream = stream;
  updateComposer();
  ui.messages.setAttribute("aria-busy", "true");
  const renderer = replyRenderer(reply);
  renderer.update("");
  let text = "";
  let started = false;
  let finished = false;
  try {
    const response = await send(method, path, body, { signal: controller.signal });
    started = true;
    for (const element of replaced) element.remove();
    for await (const { event, data } of readServerSentEvents(response)) {
      const payload = parseEventData(data);
      if (event === "start") {
        reply.dataset.messageId = payload.assistant_message_id;
        if (pending[0] && payload.user_message_id !== undefined) pending[0].dataset.messageId = payload.user_message_id;
      } else if (event === "delta") {
        text += payload.text ?? "";
        renderer.update(text);
      } else if (event === "done") {
        finished = true;
        renderer.finish(text);
        setMessageStatus(reply, payload.status ?? "complete");
        if (payload.completion_tokens) setMessageStats(reply, payload);
      } else if (event === "error") {
        finished = true;
        renderer.finish(text);
        setMessageStatus(reply, "error", payload.message || "The server could not finish this reply.");
      }
    }
    if (!finished) {
      renderer.finish(text);
      setMessageStatus(reply, stream.stopRequested ? "stopped" : "interrupted");
      if (!stream.stopRequested) {
        showNotice({
          kind: "error",
          text: "The connection closed before the reply finished; the partial reply is kept.",
          actionLabel: "Reload conversation",
          action: () => openConversation(conversationId),
        });
      }
    }
  } catch (error) {
    renderer.finish(text);
    if (error.name === "AbortError") {
      setMessageStatus(reply, "stopped");
    } else if (!started) {
      for (const element of pending) element.remove();
      reply.remove();
      for (const element of replaced) element.hidden = false;
      if (draft !== null && !ui.prompt.value) {
        ui.prompt.value = draft;
        resizePrompt();
      }
      if (error instanceof ApiError) showRequestError(error, retry);
      else showNotice({ kind: "error", text: describeError(error) });
    } else {
      setMessageStatus(reply, "interrupted");
      showNotice({
        kind: "error",
        text: "Lost connection while the reply was streaming. The server keeps what was written so far.",
        actionLabel: "Retry",
        action: () => openConversation(conversationId),
      });
    }
  } finally {
    if (state.stream === stream) state.stream = null;
    ui.messages.removeAttribute("aria-busy");
    updateComposer();
    refreshConversationOrder(conversationId);
  }
  return started;
}

async function refreshConversationOrder() {
  try {
    state.conversations = await api("GET", "/api/conversations");
    renderConversationList();
    drawMemoryMarker();
  } catch {
    // The list only reorders; a failure here is shown by the next real action.
  }
}

function titleFrom(content) {
  const line = content.trim().split("\n")[0];
  return line.length > TITLE_LENGTH ? `${line.slice(0, TITLE_LENGTH - 1)}…` : line;
}

async function submitPrompt() {
  const content = ui.prompt.value;
  if (!content.trim() || state.stream) return;
  hideNotice();
  if (state.currentId === null) {
    ui.send.disabled = true;
    try {
      const conversation = await api("POST", "/api/conversations", {
        title: titleFrom(content),
        ...(state.draftSettings ?? {}),
      });
      state.draftSettings = null;
      state.conversations.unshift(conversation);
      state.currentId = conversation.id;
      setConversationHash(conversation.id);
      ui.conversationTitle.textContent = conversation.title || "Untitled";
      updateConversationTools();
      renderConversationList();
      clear(ui.messagesInner);
    } catch (error) {
      showRequestError(error, submitPrompt);
      return;
    } finally {
      ui.send.disabled = false;
    }
  }
  ui.messagesInner.querySelector(".welcome")?.remove();
  ui.prompt.value = "";
  resizePrompt();
  const question = messageElement({ role: "user", content, status: "complete" });
  const reply = messageElement({ role: "assistant", content: "", status: "streaming" });
  ui.messagesInner.append(question, reply);
  scrollToBottom();
  await streamReply({
    conversationId: state.currentId,
    path: `/api/conversations/${state.currentId}/messages`,
    body: { content },
    reply,
    pending: [question],
    retry: submitPrompt,
    draft: content,
  });
}

/** Writes a reply again: `target` (a reply on the page, the later turns go with it) or the last. */
async function regenerate(target = null) {
  if (state.stream || state.currentId === null) return;
  const messages = [...ui.messagesInner.querySelectorAll(".message")];
  const last = messages[messages.length - 1];
  const chosen = target instanceof Element ? target : last?.dataset.role === "assistant" ? last : null;
  if (chosen && chosen !== last && !(await confirmReplacing(chosen, "regenerate"))) return;
  hideNotice();
  const replaced = chosen ? [chosen, ...laterMessages(chosen)] : [];
  for (const element of replaced) element.hidden = true;
  const reply = messageElement({ role: "assistant", content: "", status: "streaming" });
  ui.messagesInner.append(reply);
  scrollToBottom();
  const body = { message_id: chosen?.dataset.messageId ? Number(chosen.dataset.messageId) : undefined };
  await streamReply({
    conversationId: state.currentId,
    path: `/api/conversations/${state.currentId}/regenerate`,
    body: chosen && chosen !== last ? body : undefined,
    reply,
    replaced,
    retry: () => regenerate(target),
  });
}

/** Stop: tell the server (any instance sees the flag) and close our stream at once. */
async function stopGeneration() {
  const stream = state.stream;
  if (!stream || stream.stopRequested) return;
  stream.stopRequested = true;
  updateComposer();
  const stopCall = api("POST", `/api/conversations/${stream.conversationId}/stop`).then(
    () => null,
    (error) => error,
  );
  // Give the stop flag a head start so the server records "stopped" rather than a disconnect.
  await Promise.race([stopCall, new Promise((resolve) => setTimeout(resolve, 500))]);
  stream.controller.abort();
  const failure = await stopCall;
  if (failure && failure.status !== 401) {
    showNotice({
      kind: "warning",
      text: `The reply stopped here, but the server did not confirm the stop: ${describeError(failure)}`,
    });
  }
}

function abortStream() {
  state.stream?.controller.abort();
  state.stream = null;
}

function updateComposer() {
  const streaming = state.stream !== null;
  ui.send.hidden = streaming;
  ui.stop.hidden = !streaming;
  ui.stop.disabled = streaming && state.stream.stopRequested;
  const hasMessages = ui.messagesInner.querySelector(".message") !== null;
  ui.regenerate.disabled = streaming || state.currentId === null || !hasMessages;
}

function resizePrompt() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 220)}px`;
}

// ---- memory marker, settings, export, search, delete all ----------------------------------------

/** Marks the first message the model still saw on the latest turn: older ones are kept and
 * shown, but no longer fit its prompt budget. */
function drawMemoryMarker() {
  ui.messagesInner.querySelector(".memory-marker")?.remove();
  const startId = findConversation(state.currentId)?.context_start_message_id;
  if (startId === null || startId === undefined) return;
  const first = ui.messagesInner.querySelector(`.message[data-message-id="${CSS.escape(String(startId))}"]`);
  if (!first || first === ui.messagesInner.querySelector(".message")) return;
  first.before(
    h(
      "div",
      { class: "memory-marker", role: "note" },
      h("span", {}, "The model's memory of this conversation begins here"),
      h(
        "span",
        { class: "memory-marker__detail" },
        "Earlier messages are kept, but no longer fit what the model reads each turn.",
      ),
    ),
  );
}

function updateConversationTools() {
  const id = state.currentId;
  ui.exportMarkdown.hidden = id === null;
  ui.exportJson.hidden = id === null;
  if (id !== null) {
    ui.exportMarkdown.href = `/api/conversations/${encodeURIComponent(id)}/export?format=markdown`;
    ui.exportJson.href = `/api/conversations/${encodeURIComponent(id)}/export?format=json`;
  }
  if (!ui.settingsPanel.hidden) fillSettings();
}

function currentSettings() {
  if (state.currentId === null) {
    return state.draftSettings ?? { system_prompt: state.defaultSystemPrompt, temperature: null, max_tokens: null };
  }
  return findConversation(state.currentId) ?? {};
}

function fillSettings() {
  const settings = currentSettings();
  ui.systemPrompt.value = settings.system_prompt ?? "";
  ui.temperature.value = settings.temperature ?? "";
  ui.maxTokens.value = settings.max_tokens ?? "";
  ui.settingsStatus.textContent = "";
}

function toggleSettings(open = ui.settingsPanel.hidden) {
  ui.settingsPanel.hidden = !open;
  ui.settingsToggle.setAttribute("aria-expanded", String(open));
  if (open) {
    fillSettings();
    ui.systemPrompt.focus();
  }
}

function numberOrNull(input) {
  return input.value.trim() === "" ? null : Number(input.value);
}

async function saveSettings() {
  if (!ui.settingsPanel.reportValidity()) return;
  const settings = {
    system_prompt: ui.systemPrompt.value,
    temperature: numberOrNull(ui.temperature),
    max_tokens: numberOrNull(ui.maxTokens),
  };
  if (state.currentId === null) {
    state.draftSettings = settings;
    ui.settingsStatus.textContent = "Saved: used from the first message.";
    return;
  }
  try {
    const updated = await api("PATCH", `/api/conversations/${state.currentId}`, settings);
    Object.assign(findConversation(state.currentId) ?? {}, updated);
    ui.settingsStatus.textContent = "Saved: used from the next message.";
  } catch (error) {
    ui.settingsStatus.textContent = "";
    showNotice({ kind: "error", text: `Settings not saved: ${describeError(error)}` });
  }
}

async function loadDefaults() {
  try {
    state.defaultSystemPrompt = (await api("GET", "/api/conversations/defaults")).default_system_prompt ?? "";
  } catch {
    state.defaultSystemPrompt = "";
  }
}

/** A search snippet as text nodes, the matched words in <mark> (never parsed as HTML). */
function snippetElement(snippet) {
  const element = h("span", { class: "search-result__snippet" });
  const parts = snippet.split(MATCH_START);
  element.append(parts[0]);
  for (const part of parts.slice(1)) {
    const [matched, rest = ""] = part.split(MATCH_END);
    element.append(h("mark", {}, matched), rest);
  }
  return element;
}

function scheduleSearch() {
  clearTimeout(state.searchTimer);
  state.searchTimer = setTimeout(runSearch, SEARCH_DELAY_MS);
}

async function runSearch() {
  const query = ui.search.value.trim();
  if (!query) {
    ui.searchResults.hidden = true;
    clear(ui.searchResults);
    return;
  }
  let results;
  try {
    results = await api("GET", `/api/conversations?q=${encodeURIComponent(query)}`);
  } catch (error) {
    showRequestError(error, runSearch);
    return;
  }
  if (ui.search.value.trim() !== query) return; // a newer search is on its way
  clear(ui.searchResults);
  ui.searchResults.hidden = false;
  if (results.length === 0) {
    ui.searchResults.append(h("p", { class: "empty-hint" }, `Nothing found for “${query}”.`));
    return;
  }
  const list = h("ul", { class: "search-results__list", "aria-label": "Search results" });
  for (const conversation of results) {
    const title = conversation.title || "Untitled";
    if (conversation.matches.length === 0) {
      list.append(h("li", {}, resultButton(conversation.id, null, h("strong", {}, title))));
    }
    for (const match of conversation.matches) {
      list.append(
        h(
          "li",
          {},
          resultButton(
            conversation.id,
            match.message_id,
            h("strong", {}, title),
            h("span", { class: "search-result__role" }, match.role === "user" ? "You" : "Zeus"),
            snippetElement(match.snippet),
          ),
        ),
      );
    }
  }
  ui.searchResults.append(list);
}

function resultButton(conversationId, messageId, ...children) {
  return h(
    "button",
    {
      class: "search-result",
      type: "button",
      onclick: async () => {
        if (!findConversation(conversationId)) await loadConversations();
        await openConversation(conversationId);
        if (messageId !== null) showMessage(messageId);
      },
    },
    ...children,
  );
}

function showMessage(messageId) {
  const target = ui.messagesInner.querySelector(`.message[data-message-id="${CSS.escape(String(messageId))}"]`);
  if (!target) return;
  target.scrollIntoView({ block: "center" });
  target.classList.add("message--found");
  setTimeout(() => target.classList.remove("message--found"), 2500);
}

async function deleteAllConversations() {
  const confirmed = await confirmDialog({
    title: "Delete all your conversations?",
    message: `All ${state.conversations.length} conversations and their messages will be deleted. This cannot be undone.`,
    confirmLabel: "Delete all",
    danger: true,
  });
  if (!confirmed) return;
  try {
    await stopGeneration();
    await api("DELETE", "/api/conversations");
  } catch (error) {
    showRequestError(error, null);
    return;
  }
  state.conversations = [];
  showDraft();
}

// ---- start-up ---------------------------------------------------------------------------------

async function enterChat(user) {
  state.user = user;
  ui.userEmail.textContent = user.email;
  ui.adminLink.hidden = user.role !== "admin";
  showView("chat");
  hideNotice();
  await Promise.all([loadConversations(), loadDefaults()]);
  // The composer is usable at once: a message sent (or a conversation opened) while the list
  // was loading owns the view now, and replacing it would detach the reply that is streaming.
  if (state.currentId !== null || state.stream) {
    renderConversationList();
    return;
  }
  const fromHash = conversationHashId();
  if (fromHash !== null && findConversation(fromHash)) {
    await openConversation(findConversation(fromHash).id, { pushHistory: false });
  } else {
    showDraft();
  }
  ui.prompt.focus();
}

async function boot() {
  showView("boot");
  ui.bootRetry.hidden = true;
  ui.bootMessage.textContent = "Loading Zeus…";
  try {
    const user = await currentUser();
    if (user) await enterChat(user);
    else showLogin();
  } catch (error) {
    ui.bootMessage.textContent = describeError(error);
    ui.bootRetry.hidden = false;
    ui.bootRetry.focus();
  }
}

ui.bootRetry.addEventListener("click", boot);
ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  submitPrompt();
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submitPrompt();
  }
});
ui.prompt.addEventListener("input", resizePrompt);
ui.stop.addEventListener("click", stopGeneration);
ui.regenerate.addEventListener("click", () => regenerate());
ui.newChat.addEventListener("click", showDraft);
ui.search.addEventListener("input", scheduleSearch);
ui.searchForm.addEventListener("submit", (event) => {
  event.preventDefault();
  runSearch();
});
ui.deleteAll.addEventListener("click", deleteAllConversations);
ui.settingsToggle.addEventListener("click", () => toggleSettings());
ui.settingsCancel.addEventListener("click", () => toggleSettings(false));
ui.settingsPanel.addEventListener("submit", (event) => {
  event.preventDefault();
  saveSettings();
});
ui.noticeClose.addEventListener("click", hideNotice);
ui.logout.addEventListener("click", async () => {
  await stopGeneration();
  await signOut();
  window.history.replaceState(null, "", window.location.pathname);
  showLogin();
});
ui.toggleSidebar.addEventListener("click", () => {
  const open = ui.sidebar.dataset.open !== "true";
  ui.sidebar.dataset.open = String(open);
  ui.toggleSidebar.setAttribute("aria-expanded", String(open));
  if (open) ui.newChat.focus();
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && ui.sidebar.dataset.open === "true") {
    closeSidebarOnNarrow();
    ui.toggleSidebar.focus();
  }
});
// Back/forward and pasted links (#c/ID) open that conversation, including one made in another tab.
window.addEventListener("hashchange", async () => {
  if (!state.user) return;
  const id = conversationHashId();
  if (id === null) {
    if (state.currentId !== null) showDraft();
    return;
  }
  if (String(id) === String(state.currentId)) return;
  if (!findConversation(id)) await loadConversations();
  if (findConversation(id)) await openConversation(findConversation(id).id, { pushHistory: false });
  else showNotice({ kind: "error", text: "That conversation does not exist (or is not yours)." });
});
window.addEventListener("zeus:unauthorized", () => {
  if (state.user) showLogin("Your session has ended. Please sign in again.");
});

decorateIcons();
boot();
