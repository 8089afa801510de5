// chatterd's chat page: accounts, the user's conversations, and replies streamed from
// POST /llmchat.  Plain DOM, no framework, no build step; served with a strict CSP.
//
// Model output reaches the DOM only two ways: as text nodes while it streams, and, once
// a reply is finished (or loaded from storage), as the output of renderMarkdown()
// (markdown.js), which parses with raw HTML off and sanitizes the result.  Nothing here
// sets HTML from a string.  The SSE framing is read by sse.js.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    loading: $("loading"), account: $("account"), whoami: $("whoami"), logout: $("logout"),
    authView: $("auth-view"), authForm: $("auth-form"), username: $("username"),
    password: $("password"), authError: $("auth-error"),
    chatView: $("chat-view"), newChat: $("new-chat"), list: $("conversation-list"),
    listNote: $("list-note"), title: $("conversation-title"), model: $("model"),
    note: $("conversation-note"), messages: $("messages"), composer: $("composer"),
    message: $("message"), send: $("send"), stop: $("stop"), announce: $("announce"),
    olderChats: $("older-chats"),
  };

  const state = {
    user: null,        // {username, created_at} while signed in
    appID: null,       // the conversation on screen; null for a new chat not sent yet
    conversations: [], // GET /conversations, newest first
    stream: null,      // the reply being streamed, if any (one at a time)
    view: 0,           // bumped on every navigation, so late answers for an old view are dropped
    poll: null,        // timer reading the conversation once more after a reload
    shown: -1,         // how many stored messages are on screen
    model: null,       // the model of the conversation on screen, once known
    nextPage: null,    // the URL of the list's next page, if there is one
  };

  const renderMarkdown = window.chatterd.renderMarkdown; // markdown.js

  // ---- talking to chatterd ---------------------------------------------------------------

  async function api(method, path, body) {
    const init = { method, credentials: "same-origin", headers: {} };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (e) {
      return { status: 0, ok: false, data: null, error: "chatterd cannot be reached: " + e.message };
    }
    let data = null;
    if (response.status !== 204 && (response.headers.get("Content-Type") || "").includes("json")) {
      try { data = await response.json(); } catch (e) { data = null; }
    }
    const result = { status: response.status, ok: response.ok, data, response,
      error: response.ok ? null : errorText(response, data) };
    if (response.status === 401 && state.user && !path.startsWith("/auth/")) sessionEnded();
    return result;
  }

  function errorText(response, data) {
    let message = `${response.status} ${response.statusText}`.trim();
    if (data && typeof data.error === "string") message = data.error;
    else if (data && data.error && typeof data.error.message === "string") message = data.error.message;
    if (response.status === 429) {
      const wait = retryAfter(response);
      if (wait !== null && !/\d+\s*s\b/.test(message)) message += ` (try again in ${wait} s)`;
    }
    return message;
  }

  function retryAfter(response) {
    const value = response.headers.get("Retry-After");
    if (!value) return null;
    if (/^\d+$/.test(value.trim())) return Number(value.trim());
    const when = Date.parse(value);
    return Number.isNaN(when) ? null : Math.max(0, Math.ceil((when - Date.now()) / 1000));
  }

  // ---- pages and addresses ---------------------------------------------------------------

  function conversationURL(appID) { return "/chat/c/" + encodeURIComponent(appID); }

  function appIDFromLocation() {
    const match = location.pathname.match(/^\/chat\/c\/([^/]+)\/?$/);
    if (!match) return null;
    try { return decodeURIComponent(match[1]); } catch (e) { return null; }
  }

  function newAppID() {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function show(element, visible) { element.hidden = !visible; }

  function announce(text) { els.announce.textContent = text; }

  // ---- accounts --------------------------------------------------------------------------

  function showAuth(message) {
    state.user = null;
    show(els.loading, false);
    show(els.chatView, false);
    show(els.account, false);
    show(els.authView, true);
    els.authError.textContent = message || "";
    els.username.focus();
  }

  function sessionEnded() {
    if (state.stream) { state.stream.stopped = true; state.stream.controller.abort(); }
    clearConversation();
    state.appID = null;
    state.conversations = [];
    state.nextPage = null;
    els.list.replaceChildren();
    showAuth("Your session has ended; log in again.");
  }

  async function onAuthSubmit(event) {
    event.preventDefault();
    const action = event.submitter && event.submitter.value === "signup" ? "signup" : "login";
    const username = els.username.value.trim();
    const password = els.password.value;
    if (!username || !password) {
      els.authError.textContent = "Enter a username and a password.";
      return;
    }
    const buttons = els.authForm.querySelectorAll("button");
    buttons.forEach((b) => { b.disabled = true; });
    els.authError.textContent = "";
    try {
      const result = await api("POST", `/auth/${action}`, { username, password });
      if (!result.ok) {
        els.authError.textContent = result.error;
        return;
      }
      els.password.value = "";
      const me = await api("GET", "/auth/me");
      if (me.ok && me.data) enterChat(me.data);
      else showAuth(me.status === 401
        ? "Signed in, but the browser did not keep the session cookie (it needs https, or localhost)."
        : me.error);
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
    }
  }

  async function logOut() {
    if (state.stream) await stopStream();
    await api("POST", "/auth/logout");
    // A fresh page: nothing of this user's conversations stays in memory or in the DOM.
    location.assign("/chat/");
  }

  function enterChat(user) {
    state.user = user;
    els.whoami.textContent = user.username;
    show(els.loading, false);
    show(els.authView, false);
    show(els.account, true);
    show(els.chatView, true);
    loadModels();
    loadConversations();
    route();
  }

  // ---- the model picker ------------------------------------------------------------------

  async function loadModels() {
    const result = await api("GET", "/v1/models");
    const ids = result.ok && result.data && Array.isArray(result.data.data)
      ? result.data.data.map((m) => m && m.id).filter((id) => typeof id === "string") : [];
    const wanted = els.model.value;
    els.model.replaceChildren(...ids.map((id) => new Option(id, id)));
    if (!ids.length) {
      els.model.append(new Option("no model available", ""));
      els.note.textContent = result.ok ? "No upstream lists a model." : `Models: ${result.error}`;
    }
    selectModel(state.model || wanted);
  }

  function selectModel(name) {
    if (typeof name !== "string" || !name) return;
    state.model = name; // kept for when the model list arrives
    if (Array.from(els.model.options).some((o) => o.value === name)) els.model.value = name;
  }

  // ---- the conversation list -------------------------------------------------------------

  function currentConversation() {
    return state.conversations.find((c) => c.appID === state.appID) || null;
  }

  function conversationTitle(c) {
    return (typeof c.title === "string" && c.title.trim()) ? c.title.trim() : "Untitled";
  }

  // The list comes in pages (newest first); a Link header rel="next" names the next one.
  async function loadConversations(more) {
    const path = more ? state.nextPage : "/conversations";
    if (!path) return;
    const result = await api("GET", path);
    if (!result.ok) {
      els.listNote.textContent = `Conversations: ${result.error}`;
      return;
    }
    const data = result.data;
    const items = (Array.isArray(data) ? data
      : (data && (data.conversations || data.items || data.data)) || [])
      .filter((c) => c && typeof c.appID === "string");
    state.conversations = more ? state.conversations.concat(items) : items;
    const next = /<([^>]+)>\s*;\s*rel="?next"?/.exec(result.response.headers.get("Link") || "");
    state.nextPage = next && next[1].startsWith("/conversations?") ? next[1] : null;
    els.olderChats.hidden = !state.nextPage;
    els.listNote.textContent = state.conversations.length ? "" : "No conversations yet.";
    renderList();
    const current = currentConversation();
    if (current) {
      if (current.title) els.title.textContent = conversationTitle(current);
      if (!state.model) selectModel(current.model);
    }
  }

  function renderList() {
    els.list.replaceChildren(...state.conversations.map(listItem));
  }

  function listItem(c) {
    const li = document.createElement("li");
    li.className = "conversation-item";
    const link = document.createElement("a");
    link.href = conversationURL(c.appID);
    link.textContent = conversationTitle(c);
    if (c.appID === state.appID) link.setAttribute("aria-current", "page");
    const rename = smallButton("Rename", `Rename ${conversationTitle(c)}`, () => startRename(li, c));
    const remove = smallButton("Delete", `Delete ${conversationTitle(c)}`, () => confirmDelete(li, c));
    li.append(link, rename, remove);
    return li;
  }

  function smallButton(text, label, onClick) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "small";
    button.textContent = text;
    if (label) button.setAttribute("aria-label", label);
    button.addEventListener("click", onClick);
    return button;
  }

  function startRename(li, c) {
    const form = document.createElement("form");
    form.className = "rename";
    const label = document.createElement("label");
    const id = "rename-" + Math.random().toString(36).slice(2);
    label.htmlFor = id;
    label.textContent = "Title";
    const input = document.createElement("input");
    input.id = id;
    input.value = c.title || "";
    input.maxLength = 200;
    const save = document.createElement("button");
    save.type = "submit";
    save.className = "small";
    save.textContent = "Save";
    const cancel = smallButton("Cancel", null, () => { renderList(); });
    form.append(label, input, save, cancel);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const result = await api("PATCH", `/conversations/${encodeURIComponent(c.appID)}`,
        { title: input.value.trim() });
      if (!result.ok) { els.listNote.textContent = `Rename: ${result.error}`; return; }
      await loadConversations();
      focusListLink(c.appID);
    });
    input.addEventListener("keydown", (event) => {
      if (event.key === "Escape") { renderList(); focusListLink(c.appID); }
    });
    li.replaceChildren(form);
    input.focus();
    input.select();
  }

  function confirmDelete(li, c) {
    const question = document.createElement("span");
    question.textContent = `Delete “${conversationTitle(c)}”?`;
    const yes = smallButton("Yes, delete", null, async () => {
      const result = await api("DELETE", `/conversations/${encodeURIComponent(c.appID)}`);
      if (!result.ok && result.status !== 404) {
        els.listNote.textContent = `Delete: ${result.error}`;
        return;
      }
      if (state.appID === c.appID) navigate("/chat/");
      await loadConversations();
      els.newChat.focus();
    });
    const no = smallButton("Keep", null, () => { renderList(); focusListLink(c.appID); });
    li.replaceChildren(question, yes, no);
    no.focus();
  }

  function focusListLink(appID) {
    const link = els.list.querySelector(`a[href="${CSS.escape(conversationURL(appID))}"]`);
    if (link) link.focus();
  }

  // ---- navigation ------------------------------------------------------------------------

  function navigate(url) {
    if (location.pathname !== url) history.pushState(null, "", url);
    route();
  }

  function route() {
    const appID = appIDFromLocation();
    if (appID) openConversation(appID);
    else startNewChat();
  }

  function clearConversation() {
    state.view += 1;
    state.model = null;
    if (state.poll) { clearTimeout(state.poll); state.poll = null; }
    els.messages.replaceChildren();
    els.note.textContent = "";
  }

  function startNewChat() {
    clearConversation();
    state.appID = null;
    els.title.textContent = "New chat";
    renderList();
    updateButtons();
  }

  // A reply that cannot be resumed after a reload (see remember()) is stored by chatterd a
  // moment later, possibly after this page has read the conversation.  So a page that was
  // reloaded reads it once more, a second later, and shows it again if it has changed
  // (GET /conversations/{appID} shows ended turns only).
  let lookAgainAfterReload =
    (performance.getEntriesByType("navigation")[0] || {}).type === "reload";
  const LOOK_AGAIN_MS = 1000;

  async function openConversation(appID, again = false, afterResume = false) {
    if (!again) {
      clearConversation();
      state.appID = appID;
      state.shown = -1;
      els.title.textContent = "…";
      renderList();
      updateButtons();
    }
    const lookAgain = lookAgainAfterReload && !again;
    lookAgainAfterReload = false;
    const view = state.view;
    const result = await api("GET", `/conversations/${encodeURIComponent(appID)}`);
    if (view !== state.view) return; // the user went elsewhere meanwhile
    const running = !again && !state.stream ? remembered(appID) : null;
    if (running && (result.ok || result.status === 404)) {
      // A reply this tab was streaming before a reload: stored, or still to be resumed.
      const count = result.ok ? storedMessages(result.data).length : 0;
      if (count > running.before) remember(null);
      else {
        if (result.ok) showConversation(appID, result.data);
        else { state.appID = appID; els.title.textContent = titleFrom(running.text); }
        resumeReply(running);
        return;
      }
    }
    if (lookAgain) state.poll = setTimeout(() => openConversation(appID, true), LOOK_AGAIN_MS);
    if (!result.ok) {
      // After a reload, a 404 may be a first turn not stored yet: the second look decides.
      if (lookAgain && result.status === 404) return;
      if (again && state.shown >= 0) return; // keep what the first look showed
      if (state.stream && state.stream.appID === appID) return;
      state.appID = null; // a message sent from here starts a new conversation
      els.title.textContent = result.status === 404 ? "No such conversation" : "Conversation";
      els.note.textContent = result.status === 404
        ? "This conversation does not exist or is not yours."
        : `The conversation could not be loaded: ${result.error}`;
      renderList();
      updateButtons();
      return;
    }
    const messages = storedMessages(result.data);
    if (again && !afterResume && (messages.length === state.shown || state.stream)) return;
    showConversation(appID, result.data);
  }

  function showConversation(appID, data) {
    const messages = storedMessages(data);
    state.appID = appID;
    state.shown = messages.length;
    els.note.textContent = "";
    els.messages.replaceChildren();
    for (const m of messages) showStoredMessage(m);
    const current = currentConversation();
    const stored = data && typeof data.title === "string" ? data.title : "";
    const firstUser = messages.find((m) => m && m.role === "user" && typeof m.content === "string");
    els.title.textContent = (current && current.title && conversationTitle(current)) || stored
      || (firstUser && titleFrom(firstUser.content)) || "Conversation";
    const lastModel = messages.map((m) => m && m.model).filter((m) => typeof m === "string").pop();
    selectModel(lastModel || (data && data.model) || (current && current.model));
    scrollToEnd(true);
    renderList();
    updateButtons();
  }

  function storedMessages(data) {
    if (Array.isArray(data)) return data;
    if (data && Array.isArray(data.messages)) return data.messages;
    return [];
  }

  // ---- messages --------------------------------------------------------------------------

  const ROLE_NAMES = { user: "You", assistant: "Assistant", system: "System", tool: "Tool" };

  function addMessage(role) {
    const li = document.createElement("li");
    li.className = "message";
    li.dataset.role = role;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = ROLE_NAMES[role] || role;
    const body = document.createElement("div");
    body.className = "body";
    li.append(who, body);
    els.messages.append(li);
    return { li, body };
  }

  function plainText(target, text) {
    const div = document.createElement("div");
    div.className = "plain";
    div.textContent = text;
    target.replaceChildren(div);
  }

  function mark(li, status, text) {
    li.dataset.status = status;
    const p = document.createElement("p");
    p.className = "mark mark-" + status;
    p.textContent = text;
    li.append(p);
  }

  const STATUS_MARKS = {
    interrupted: "Interrupted: this reply was cut short.",
    failed: "Failed: the model's server ended this reply with an error.",
  };

  function showStoredMessage(m) {
    if (!m || typeof m !== "object") return;
    const role = typeof m.role === "string" ? m.role : "assistant";
    const content = typeof m.content === "string" ? m.content : "";
    const item = addMessage(role);
    if (role === "assistant") renderMarkdown(item.body, content);
    else plainText(item.body, content);
    const calls = m.tool_calls || (m.message && m.message.tool_calls);
    if (Array.isArray(calls) && calls.length) showToolCalls(item.body, calls);
    const status = m.status || m.turn_status;
    if (role !== "assistant" || !STATUS_MARKS[status]) return;
    const why = typeof m.error === "string" && m.error ? m.error : "";
    mark(item.li, status, status === "failed" && why ? `Failed: ${why}`
      : STATUS_MARKS[status] + (why ? ` (${why})` : ""));
  }

  function showToolCalls(target, calls) {
    for (const call of calls) {
      const fn = call && call.function ? call.function : {};
      const p = document.createElement("p");
      p.className = "tool-call";
      p.textContent = `Tool call: ${String(fn.name || "?")}(${JSON.stringify(fn.arguments ?? {})})`;
      target.append(p);
    }
  }

  let scrollPending = false;
  function scrollToEnd(force) {
    const box = els.messages;
    const near = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    if (!force && !near) return; // the reader scrolled up: leave them there
    if (scrollPending) return;
    scrollPending = true;
    requestAnimationFrame(() => {
      scrollPending = false;
      box.scrollTop = box.scrollHeight;
      if (!force) return;
      els.composer.scrollIntoView({ block: "nearest" });
    });
  }

  // ---- sending and streaming -------------------------------------------------------------

  // A running reply survives a reload of its page: /llmchat is asked to keep generating for
  // a while after its client leaves, and sessionStorage (this tab only) remembers the turn,
  // so the reloaded page resumes its stream (GET /turns/{id}/events).  What is remembered:
  // the turn's id and appID, the user's message (the stored conversation shows ended turns
  // only) and how many stored messages came before it (so a turn that has ended and is
  // shown from storage is not shown a second time).
  const KEEP_GENERATING_S = 30;
  const RUNNING_KEY = "chatterd.running";

  function remember(running) {
    try {
      if (running) sessionStorage.setItem(RUNNING_KEY, JSON.stringify(running));
      else sessionStorage.removeItem(RUNNING_KEY);
    } catch (e) { /* storage off: a reload then shows the stored reply only */ }
  }

  function remembered(appID) {
    try {
      const running = JSON.parse(sessionStorage.getItem(RUNNING_KEY) || "null");
      return running && running.appID === appID ? running : null;
    } catch (e) { return null; }
  }

  function updateButtons() {
    const streaming = Boolean(state.stream);
    els.send.disabled = streaming;
    els.stop.disabled = !(streaming && state.stream.appID === state.appID);
  }

  async function send() {
    const text = els.message.value;
    if (!text.trim() || state.stream) return;
    const model = els.model.value;
    if (!model) {
      els.note.textContent = "There is no model to send to: no upstream lists one.";
      return;
    }
    const isNew = !state.appID;
    const appID = state.appID || newAppID();
    state.appID = appID;
    if (isNew) els.title.textContent = titleFrom(text);
    els.message.value = "";
    els.note.textContent = "";

    const before = els.messages.querySelectorAll("li[data-role]:not([data-status='rejected'])").length;
    const stream = beginReply(appID, text);

    let outcome;
    try {
      const response = await fetch("/llmchat", {
        method: "POST", credentials: "same-origin", signal: stream.controller.signal,
        headers: { "Content-Type": "application/json",
          "X-Chatterd-Keep-Generating": String(KEEP_GENERATING_S) },
        body: JSON.stringify({ appID, model, stream: true, messages: [{ role: "user", content: text }] }),
      });
      if (!response.ok) {
        let data = null;
        try { data = await response.json(); } catch (e) { data = null; }
        rejected(stream, response, data);
        return;
      }
      stream.started = true;
      stream.turn = response.headers.get("X-Chatterd-Turn");
      if (stream.turn) remember({ turn: stream.turn, appID, text, before });
      if (stream.stopped) stopTurn(stream); // Stop was pressed before the turn had an id
      if (isNew && state.appID === appID && !appIDFromLocation()) {
        history.pushState(null, "", conversationURL(appID));
      }
      contextNote(stream, response.headers.get("X-Chatterd-Context"));
      await readEvents(stream, response.body);
      outcome = streamOutcome(stream);
    } catch (e) {
      if (!stream.started && !stream.stopped) {
        rejected(stream, null, null, "chatterd cannot be reached: " + e.message);
        return;
      }
      outcome = streamOutcome(stream);
    } finally {
      endStream(stream);
    }
    finishReply(stream, outcome);
    // A new conversation is titled after its first message (the list shows titles); the
    // turn has ended by now, so the conversation exists to be titled.
    if (isNew) await api("PATCH", `/conversations/${encodeURIComponent(appID)}`,
      { title: titleFrom(text) });
    loadConversations();
  }

  // The user's message and an empty reply that fills as the stream arrives.
  function beginReply(appID, text) {
    const userItem = addMessage("user");
    plainText(userItem.body, text);
    const reply = addMessage("assistant");
    reply.li.setAttribute("aria-busy", "true");
    const textBox = document.createElement("div");
    textBox.className = "plain streaming";
    reply.body.append(textBox);
    const stream = { appID, text, reply, userItem, textBox, controller: new AbortController(),
      turn: null, answer: "", started: false, done: false, error: null, stopped: false,
      contextShown: false };
    state.stream = stream;
    updateButtons();
    scrollToEnd(true);
    return stream;
  }

  function streamOutcome(stream) {
    // A stopped turn's stream ends with chatterd's `event: error` saying so: not a failure.
    if (stream.stopped) return "interrupted";
    return stream.done ? "complete" : stream.error ? "failed" : "cut";
  }

  function endStream(stream) {
    if (state.stream === stream) state.stream = null;
    // Once its stream has ended here the turn has too (or its client is gone for good).
    if (stream.turn && (remembered(stream.appID) || {}).turn === stream.turn) remember(null);
    updateButtons();
  }

  // After a reload: the remembered turn's reply, from its first event, below what is stored.
  async function resumeReply(running) {
    const stream = beginReply(running.appID, running.text);
    stream.started = true;
    stream.turn = running.turn;
    let outcome;
    try {
      const response = await fetch(
        `/turns/${encodeURIComponent(running.turn)}/events?appID=${encodeURIComponent(running.appID)}`,
        { credentials: "same-origin", signal: stream.controller.signal,
          headers: { "Last-Event-ID": `${running.turn}:0` } });
      if (!response.ok) throw new Error(String(response.status));
      await readEvents(stream, response.body);
      outcome = streamOutcome(stream);
    } catch (e) {
      outcome = stream.stopped ? "interrupted" : null;
    } finally {
      endStream(stream);
    }
    if (outcome && (stream.answer || outcome !== "cut")) {
      finishReply(stream, outcome);
      // A new conversation's first turn: titled here, as send() would have.
      if (running.before === 0) await api("PATCH", `/conversations/${encodeURIComponent(running.appID)}`,
        { title: titleFrom(running.text) });
      loadConversations();
      return;
    }
    // Not resumable (404, 410, 416, no connection): the stored conversation is the truth.
    stream.userItem.li.remove();
    stream.reply.li.remove();
    if (state.appID === running.appID) openConversation(running.appID, true, true);
  }

  function titleFrom(text) {
    const line = text.trim().split("\n")[0].trim();
    return line.length > 80 ? line.slice(0, 79) + "…" : line;
  }

  // The turn was refused before its reply began: nothing was stored.
  function rejected(stream, response, data, message) {
    let text = message || (response ? errorText(response, data) : "the request failed");
    if (response && response.status === 409) {
      text = "Another reply in this conversation is still being written; " +
        `send again once it has finished. (${text})`;
    } else if (response && response.status === 401) {
      sessionEnded();
      return;
    }
    const li = stream.reply.li;
    li.removeAttribute("aria-busy");
    delete li.dataset.role;
    li.className = "message error-item";
    li.setAttribute("role", "alert");
    li.replaceChildren();
    const p = document.createElement("p");
    p.className = "error";
    p.textContent = response ? `Not sent (${response.status}): ${text}` : `Not sent: ${text}`;
    li.append(p);
    mark(stream.userItem.li, "rejected", "Not stored.");
    if (!els.message.value) els.message.value = stream.text; // let them send it again
    announce("The message was not sent.");
  }

  async function readEvents(stream, body) {
    await window.chatterd.readServerSentEvents(body, {
      comment(text) {
        if (text.startsWith("context ")) contextNote(stream, text.slice(8));
      },
      event(type, data) { handleEvent(stream, type, data); },
    });
  }

  // One event of /llmchat: a data event is one Ollama line; `error` ends the reply.
  function handleEvent(stream, type, data) {
    let event;
    try { event = JSON.parse(data); } catch (e) { return; }
    if (type === "error" || (event && event.error)) {
      stream.error = (event && typeof event.error === "string" && event.error) || "the reply failed";
      return;
    }
    const message = event && event.message;
    if (message && typeof message.content === "string" && message.content) {
      appendText(stream, message.content);
    }
    if (message && Array.isArray(message.tool_calls) && message.tool_calls.length) {
      showToolCalls(stream.reply.body, message.tool_calls);
    }
    if (event && event.done === true) stream.done = true;
  }

  function appendText(stream, piece) {
    stream.answer += piece;
    stream.textBox.append(piece); // a new text node: what is already shown is not redrawn
    scrollToEnd(false);
  }

  // "sent=5 messages/900 tokens; omitted=3 messages/2400 tokens; context=8192 tokens"
  function contextNote(stream, text) {
    if (!text || stream.contextShown) return;
    const omitted = /omitted=(\d+) messages?/.exec(text);
    if (!omitted || omitted[1] === "0") return;
    stream.contextShown = true;
    const li = document.createElement("li");
    li.className = "context-note";
    const count = omitted[1] === "1" ? "oldest message was" : `${omitted[1]} oldest messages were`;
    li.textContent = `The ${count} left out of what the model saw: ` +
      "the conversation is longer than its context budget.";
    els.messages.insertBefore(li, stream.userItem.li);
  }

  function finishReply(stream, outcome) {
    const li = stream.reply.li;
    li.removeAttribute("aria-busy");
    renderMarkdown(stream.reply.body, stream.answer);
    if (outcome === "complete") {
      li.dataset.status = "complete";
      announce("The reply is complete.");
    } else if (outcome === "interrupted") {
      mark(li, "interrupted", "Interrupted: you stopped this reply; what had arrived is kept.");
      announce("The reply was stopped.");
    } else if (outcome === "failed") {
      mark(li, "failed", `Failed: ${stream.error}`);
      li.querySelector(".mark").setAttribute("role", "alert");
    } else {
      mark(li, "interrupted", "Interrupted: the connection ended before the reply was complete.");
      li.querySelector(".mark").setAttribute("role", "alert");
    }
    scrollToEnd(false);
  }

  // Leaving the stream no longer ends the turn (it keeps generating for a resume): Stop
  // asks chatterd to stop it, and the stream then ends with what had been written.
  function stopStream() {
    const stream = state.stream;
    if (!stream || stream.stopped) return Promise.resolve();
    stream.stopped = true;
    return stream.turn ? stopTurn(stream) : Promise.resolve();
  }

  function stopTurn(stream) {
    return api("POST", `/turns/${encodeURIComponent(stream.turn)}/stop?appID=` +
      encodeURIComponent(stream.appID)).then((result) => {
      if (!result.ok && result.status !== 401) stream.controller.abort();
    });
  }

  // ---- wiring ----------------------------------------------------------------------------

  function wire() {
    els.authForm.addEventListener("submit", onAuthSubmit);
    els.logout.addEventListener("click", logOut);
    els.newChat.addEventListener("click", () => { navigate("/chat/"); els.message.focus(); });
    els.olderChats.addEventListener("click", () => loadConversations(true));
    els.composer.addEventListener("submit", (event) => { event.preventDefault(); send(); });
    els.stop.addEventListener("click", () => { stopStream(); els.message.focus(); });
    els.message.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.ctrlKey && !event.altKey &&
          !event.metaKey && !event.isComposing) {
        event.preventDefault();
        send();
      } else if (event.key === "Escape" && state.stream) {
        event.preventDefault();
        stopStream();
      }
    });
    els.list.addEventListener("click", (event) => {
      const link = event.target.closest("a");
      if (!link || event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey ||
          event.altKey) return;
      event.preventDefault();
      navigate(new URL(link.href).pathname);
    });
    window.addEventListener("popstate", () => { if (state.user) route(); });
  }

  async function start() {
    wire();
    const me = await api("GET", "/auth/me");
    if (me.ok && me.data) enterChat(me.data);
    else showAuth(me.status === 401 ? "" : me.error);
  }

  start();
})();
