// anna's sessions demo. Plain JavaScript against the public API. The access token is kept in
// memory only (a reload signs you out); server text is inserted with textContent, never as HTML.
"use strict";

const state = { token: null, userId: null, socket: null, selected: null, sessions: new Map(), qrTimer: null, simulator: false, lastEventId: null };
const $ = (id) => document.getElementById(id);

function log(tag, data) {
  const item = document.createElement("li");
  item.textContent = `${new Date().toLocaleTimeString()} ${tag} ${data === undefined ? "" : JSON.stringify(data, null, 1)}`;
  $("log").prepend(item);
}

async function api(method, path, body, accept) {
  const headers = {};
  if (state.token) headers["Authorization"] = `Bearer ${state.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (accept) headers["Accept"] = accept;
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), credentials: "same-origin" });
  if (accept && accept.startsWith("image/") && response.ok) return { ok: true, status: response.status, blob: await response.blob() };
  const text = await response.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = { message: text }; }
  if (!response.ok) log(`${method} ${path} → ${response.status}`, json);
  return { ok: response.ok, status: response.status, json };
}

function signedIn(token) {
  state.token = token;
  try { state.userId = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/"))).sub; } catch (_) { state.userId = null; }
  $("who").textContent = "signed in";
  $("create-session").disabled = false;
  connectSocket();
}

async function connectSocket() {
  if (state.socket) state.socket.close();
  const ticket = await api("POST", "/ws/ticket");
  if (!ticket.ok) return;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const since = state.lastEventId ? `&since=${encodeURIComponent(state.lastEventId)}` : "";
  const socket = new WebSocket(`${scheme}://${location.host}/ws/sessions?ticket=${encodeURIComponent(ticket.json.ticket)}${since}`);
  state.socket = socket;
  $("ws-state").textContent = "ws: connecting";
  socket.onopen = () => { $("ws-state").textContent = "ws: connected"; };
  socket.onclose = (e) => {
    $("ws-state").textContent = `ws: closed (${e.code})`;
    // Reconnect unless replaced or signed out; an expired token needs a new login.
    if (state.socket === socket && state.token && e.code !== 4001) setTimeout(connectSocket, 2000);
  };
  socket.onerror = () => { $("ws-state").textContent = "ws: error"; };
  socket.onmessage = (message) => {
    let event;
    try { event = JSON.parse(message.data); } catch (_) { log("parse_error", message.data); return; }
    onEvent(event);
  };
}

function onEvent(event) {
  if (event.eventId) state.lastEventId = event.eventId;
  log(event.type, event.payload);
  if (event.type === "session.snapshot") {
    state.sessions.clear();
    for (const session of event.payload.sessions) state.sessions.set(session.id, session);
    renderSessions();
    return;
  }
  const id = event.sessionId;
  if (!id) return;
  const session = state.sessions.get(id) || { id, status: "pending_qr" };
  const p = event.payload || {};
  switch (event.type) {
    case "session.created": session.status = p.status; break;
    case "session.qr.updated": session.status = "pending_qr"; session.qr = p.qr; session.qrExpiresAt = p.expiresAt; break;
    case "session.status.connected": session.status = "connected"; session.phone = p.phone; session.qr = null; session.reason = null; break;
    case "session.status.disconnected": session.status = "disconnected"; session.reason = p.reason; session.qr = null; break;
    case "session.status.failed": session.status = "failed"; session.reason = p.reason; session.qr = null; break;
    case "session.logged_out": session.status = "logged_out"; session.reason = p.reason; session.qr = null; break;
    case "session.deleted": state.sessions.delete(id); if (state.selected === id) state.selected = null; renderSessions(); return;
    case "session.message.sent": addMessage(id, `→ ${p.to}: sent (${p.messageId})`, p.messageId); break;
    case "session.message.failed": addMessage(id, `→ ${p.to}: failed: ${p.reason}`); break;
    case "session.message.status": markReceipt(id, p.messageId, p.status); break;
    case "session.message.received": addMessage(id, `← ${p.pushName || p.from}: ${p.text ?? "(no text)"}`); break;
    case "session.pair_code.issued": log("pairing code", p.code); break;
  }
  state.sessions.set(id, session);
  renderSessions();
}

function addMessage(sessionId, text, messageId) {
  if (sessionId !== state.selected) return;
  const item = document.createElement("li");
  item.textContent = text;
  if (messageId) item.dataset.messageId = messageId;
  $("messages").prepend(item);
}

function markReceipt(sessionId, messageId, status) {
  if (sessionId !== state.selected) return;
  for (const item of $("messages").children) {
    if (item.dataset.messageId === messageId) item.textContent = item.textContent.replace(/: (sent|server_ack|delivered|read) \(/, `: ${status} (`);
  }
}

function renderSessions() {
  const list = $("session-list");
  list.replaceChildren();
  for (const session of state.sessions.values()) {
    const item = document.createElement("li");
    item.textContent = `${session.id.slice(0, 8)}… ${session.status}${session.phone ? " " + session.phone : ""}`;
    item.dataset.sessionId = session.id;
    if (session.id === state.selected) item.classList.add("selected");
    item.onclick = () => { state.selected = session.id; $("messages").replaceChildren(); renderSessions(); };
    list.append(item);
  }
  renderDetail();
}

async function renderDetail() {
  const session = state.selected && state.sessions.get(state.selected);
  $("session-detail").hidden = !session;
  if (!session) return;
  $("detail-id").textContent = session.id;
  $("detail-status").textContent = session.status;
  $("detail-phone").textContent = session.phone || "";
  $("detail-reason").textContent = session.reason ? `reason: ${session.reason}` : "";
  const showQr = session.status === "pending_qr" && session.qr;
  $("qr-box").hidden = !showQr;
  $("simulate-scan").hidden = !(showQr && state.simulator);
  if (showQr && $("qr-image").dataset.qr !== session.qr) {
    $("qr-image").dataset.qr = session.qr;
    const image = await api("GET", `/sessions/${session.id}/qr`, undefined, "image/svg+xml");
    if (image.ok) {
      const old = $("qr-image").src;
      $("qr-image").src = URL.createObjectURL(image.blob);
      if (old.startsWith("blob:")) URL.revokeObjectURL(old);
    }
  }
  clearInterval(state.qrTimer);
  if (showQr && session.qrExpiresAt) {
    const tick = () => { $("qr-countdown").textContent = Math.max(0, Math.round((Date.parse(session.qrExpiresAt) - Date.now()) / 1000)); };
    tick();
    state.qrTimer = setInterval(tick, 1000);
  }
}

function selectedOrAlert() {
  if (!state.selected) { alert("Select a session first"); return null; }
  return state.selected;
}

document.addEventListener("DOMContentLoaded", async () => {
  const config = await api("GET", "/demo/config.json");
  state.simulator = Boolean(config.ok && config.json.simulator);
  $("simulator-badge").hidden = !state.simulator;

  $("signup-form").onsubmit = async (e) => {
    e.preventDefault();
    const body = { name: $("signup-name").value, email: $("signup-email").value, password: $("signup-password").value };
    const created = await api("POST", "/users", body);
    $("signup-password").value = "";
    if (created.ok) { state.userId = created.json.id; log("user.registered", created.json); $("login-email").value = body.email; }
    else alert(created.json?.message || "Sign-up failed");
  };
  $("verify-form").onsubmit = async (e) => {
    e.preventDefault();
    if (!state.userId) { alert("Sign up first"); return; }
    const verified = await api("POST", `/users/${state.userId}/verify`, { code: $("verify-code").value.trim() });
    if (verified.ok) { log("user.verified"); signedIn(verified.json.accessToken); }
    else alert(verified.json?.message || "Verification failed");
  };
  $("login-form").onsubmit = async (e) => {
    e.preventDefault();
    const logged = await api("POST", "/auth/login", { email: $("login-email").value, password: $("login-password").value });
    $("login-password").value = "";
    if (logged.ok) { log("auth.login"); signedIn(logged.json.accessToken); }
    else alert(logged.json?.message || "Login failed");
  };
  $("create-session").onclick = async () => {
    const started = await api("POST", "/sessions", {});
    if (started.ok) { state.selected = started.json.sessionId; if (!state.sessions.has(state.selected)) state.sessions.set(state.selected, { id: state.selected, status: "pending_qr" }); renderSessions(); }
    else alert(started.json?.message || "Could not create a session");
  };
  $("start-session").onclick = async () => { const id = selectedOrAlert(); if (id) await api("POST", "/sessions", { sessionId: id }); };
  $("stop-session").onclick = async () => { const id = selectedOrAlert(); if (id) await api("POST", `/sessions/${id}/stop`, { reason: "manual_stop" }); };
  $("logout-session").onclick = async () => { const id = selectedOrAlert(); if (id) await api("POST", `/sessions/${id}/logout`); };
  $("delete-session").onclick = async () => { const id = selectedOrAlert(); if (id && confirm("Delete this session and unlink its device?")) await api("DELETE", `/sessions/${id}`); };
  $("simulate-scan").onclick = async () => { const id = selectedOrAlert(); if (id) await api("POST", `/simulator/sessions/${id}/scan`); };
  $("send-form").onsubmit = async (e) => {
    e.preventDefault();
    const id = selectedOrAlert();
    if (!id) return;
    const sent = await api("POST", `/sessions/${id}/messages`, { to: $("send-to").value, content: $("send-text").value });
    if (sent.ok) { log("send accepted", sent.json); $("send-text").value = ""; }
    else alert(sent.json?.message || "Send failed");
  };
  $("clear-log").onclick = () => $("log").replaceChildren();
});
