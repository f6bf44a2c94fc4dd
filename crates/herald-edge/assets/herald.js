/*
 * herald.js: a small, dependency-free browser client for herald (and High-templar servers).
 *
 *   var herald = new Herald();   // or new Herald("wss://example.com/ws/", {token: "..."})
 *   // or, for a cluster: new Herald(["wss://edge-1/ws/", "wss://edge-2/ws/"]) -- reconnects rotate through them
 *   herald.on("authorized", function (allowedRooms) { ... });
 *   var sub = herald.subscribe({chat: "lobby"}, function (data, sub) { ... });
 *   sub.ready.then(function () { ... }, function (err) { ... });   // err.message is the server's code
 *   herald.connect();
 *   herald.rpc("add", {a: 1, b: 2}).then(function (answer) { ... }, function (err) { ... });
 *   // err.message: rpc-timeout, rpc-failed (err.status: the backend's HTTP status), method-not-allowed,
 *   // rpc-busy, not-connected or disconnected
 *
 * Events: open, authorized(allowedRooms), unauthorized, subscribed(sub), publish(data, sub), message(data),
 * error(frame), close(code, reason), reconnecting(attempt, delayMs).
 *
 * The subscription list is the source of truth: every (re)connection sends all of it once the server has
 * authorized the socket, so subscribes made while disconnected and resubscribes after a reconnect are one path.
 */
(function (global) {
  "use strict";

  function defaultUrl() {
    var loc = global.location;
    return (loc.protocol === "https:" ? "wss://" : "ws://") + loc.host + "/ws/";
  }

  function Herald(url, options) {
    if (url && typeof url === "object" && !Array.isArray(url)) { options = url; url = null; }
    options = options || {};
    // One URL, or several edges of a cluster: after a connection is lost the client moves on to the next one,
    // so clients of a failed edge land on the others and resubscribe there.
    var urls = Array.isArray(url) ? url.slice() : [url || defaultUrl()];
    // Browsers cannot set headers on a WebSocket, so the token travels as a query parameter (herald reads
    // `?token=` for JWT auth and forwards it to the backend for bootstrap auth).
    if (options.token) {
      urls = urls.map(function (u) {
        return u + (u.indexOf("?") < 0 ? "?" : "&") + "token=" + encodeURIComponent(options.token);
      });
    }
    this.urls = urls;
    this._urlIndex = 0;
    this.url = urls[0];
    this.pingInterval = options.pingInterval != null ? options.pingInterval : 30000;
    this.minBackoff = options.minBackoff != null ? options.minBackoff : 500;
    this.maxBackoff = options.maxBackoff != null ? options.maxBackoff : 30000;
    this.authorized = false;
    this.allowedRooms = null;
    this._ws = null;
    this._subs = {};          // requestId -> subscription, in subscribe order
    this._calls = {};         // requestId -> pending rpc call
    this._listeners = {};
    this._nextId = 0;
    // A per-instance prefix keeps request ids distinct from the connection id the server echoes on errors it
    // cannot attribute, and from other clients' ids in logs.
    this._prefix = "h" + Math.random().toString(36).slice(2, 8) + "-";
    this._attempt = 0;
    this._stopped = true;     // true after close() or before connect(): no reconnects
    this._pingTimer = null;
    this._retryTimer = null;
  }

  Herald.prototype.on = function (event, cb) {
    (this._listeners[event] = this._listeners[event] || []).push(cb);
    return this;
  };

  Herald.prototype.off = function (event, cb) {
    var list = this._listeners[event] || [];
    this._listeners[event] = cb ? list.filter(function (f) { return f !== cb; }) : [];
    return this;
  };

  // A throwing callback must not break the client's own bookkeeping; rethrow later so it still shows up.
  function safeCall(cb, args) {
    try { cb.apply(null, args); } catch (e) { setTimeout(function () { throw e; }); }
  }

  Herald.prototype._emit = function (event) {
    var args = Array.prototype.slice.call(arguments, 1);
    (this._listeners[event] || []).slice().forEach(function (cb) { safeCall(cb, args); });
  };

  Herald.prototype.connect = function () {
    this._stopped = false;
    clearTimeout(this._retryTimer);
    if (this._ws) return this;   // already connecting or connected
    var self = this, ws = new WebSocket(this.url);
    this._ws = ws;
    ws.onopen = function () { self._emit("open"); };
    ws.onmessage = function (event) { self._onFrame(event.data); };
    // onerror carries no detail in browsers and is always followed by onclose, which does the work.
    ws.onclose = function (event) {
      if (self._ws !== ws) return;   // a socket we already replaced
      self._ws = null;
      self.authorized = false;
      clearInterval(self._pingTimer);
      self._forEachSub(function (sub) { sub.active = false; });
      // An answer can only arrive on the socket that carried the call: calls in flight have failed.
      self._failCalls("disconnected");
      self._emit("close", event.code, event.reason);
      if (!self._stopped) self._scheduleReconnect(event.code);
    };
    return this;
  };

  Herald.prototype.close = function () {
    this._stopped = true;
    clearTimeout(this._retryTimer);
    if (this._ws) this._ws.close(1000, "client closed");
    return this;
  };

  Herald.prototype._scheduleReconnect = function (code) {
    if (this.urls.length > 1) {
      this._urlIndex = (this._urlIndex + 1) % this.urls.length;
      this.url = this.urls[this._urlIndex];
    }
    // 1001 means this server is draining: another one is ready now, so retry at once (jitter still spreads the
    // whole herd out). Otherwise back off exponentially, so a down server is not hammered by every tab.
    var attempt = ++this._attempt;
    var base = code === 1001 ? this.minBackoff
      : Math.min(this.maxBackoff, this.minBackoff * Math.pow(2, attempt - 1));
    var delay = Math.round(base / 2 + Math.random() * base / 2);
    this._emit("reconnecting", attempt, delay);
    var self = this;
    this._retryTimer = setTimeout(function () { if (!self._stopped) self.connect(); }, delay);
  };

  Herald.prototype._onFrame = function (text) {
    if (text === "pong") return;   // the answer to our keepalive; nothing to do
    var msg;
    try { msg = JSON.parse(text); } catch (e) { return; }
    if (!msg || typeof msg !== "object") return;
    // Answers to calls: rpc frames, and the plain error frame for a call the server could not parse (a bad
    // method name), which carries the call's requestId.
    var isCall = msg.requestId != null && this._calls[String(msg.requestId)];
    if (msg.type === "rpc" || (isCall && msg.code === "error")) { this._onRpcAnswer(msg); return; }
    var sub = msg.requestId != null ? this._subs[String(msg.requestId)] : undefined;

    if ("is_authorized" in msg) {
      if (!msg.is_authorized) {
        // Retrying with the same credentials would be refused again; the page must decide what to do.
        this._stopped = true;
        this._emit("unauthorized");
        return;
      }
      this.authorized = true;
      this.allowedRooms = msg.allowed_rooms;
      this._attempt = 0;
      this._startPing();
      this._emit("authorized", msg.allowed_rooms);
      var self = this;
      this._forEachSub(function (s) { self._sendSubscribe(s); });
    } else if (msg.type === "publish") {
      if (!sub) return;   // a delivery racing our unsubscribe
      if (sub.onMessage) safeCall(sub.onMessage, [msg.data, sub]);
      this._emit("publish", msg.data, sub);
    } else if (msg.type === "message") {
      this._emit("message", msg.data);
    } else if (msg.code === "success") {
      if (sub && !sub.active) {
        sub.active = true;
        sub._resolve(sub);
        this._emit("subscribed", sub);
      }
    } else if (msg.code === "error") {
      // A refused subscribe does not exist on the server, so forget it rather than resend it on reconnect.
      if (sub && !sub.active) {
        delete this._subs[sub.requestId];
        sub._reject(new Error(msg.message));
      }
      this._emit("error", msg);
    }
  };

  Herald.prototype._startPing = function () {
    // Browsers cannot send WebSocket ping frames; a text `ping` keeps proxies and the server's idle timeout
    // from closing a quiet connection.
    var self = this;
    clearInterval(this._pingTimer);
    if (this.pingInterval > 0) {
      this._pingTimer = setInterval(function () { self._send("ping"); }, this.pingInterval);
    }
  };

  Herald.prototype._send = function (text) {
    if (this._ws && this._ws.readyState === 1) this._ws.send(text);
  };

  Herald.prototype._sendSubscribe = function (sub) {
    this._send(JSON.stringify({type: "subscribe", room: sub.room, requestId: sub.requestId}));
  };

  Herald.prototype._forEachSub = function (fn) {
    var subs = this._subs;
    Object.keys(subs).forEach(function (id) { fn(subs[id]); });
  };

  Herald.prototype.subscribe = function (room, onMessage) {
    var self = this;
    var sub = {
      requestId: this._prefix + (++this._nextId),
      room: room,
      onMessage: onMessage,
      active: false,
      unsubscribe: function () { self.unsubscribe(sub); }
    };
    // `ready` settles once, on the first answer; later resubscribes only emit events. The empty catch keeps an
    // ignored refusal from being reported as an unhandled rejection (callers who chain still see it).
    sub.ready = new Promise(function (resolve, reject) { sub._resolve = resolve; sub._reject = reject; });
    sub.ready.catch(function () {});
    this._subs[sub.requestId] = sub;
    if (this.authorized) this._sendSubscribe(sub);   // otherwise sent on the next authorization
    return sub;
  };

  Herald.prototype.unsubscribe = function (sub) {
    if (!this._subs[sub.requestId]) return;
    delete this._subs[sub.requestId];
    sub.active = false;
    sub._reject(new Error("unsubscribed"));   // no-op if it already settled
    if (this.authorized) this._send(JSON.stringify({type: "unsubscribe", requestId: sub.requestId}));
  };

  /*
   * Calls `method` on the backend through the server (herald's client RPC): resolves with the backend's answer,
   * rejects with an Error whose message is the server's code. Calls are not queued while disconnected or
   * resent after a reconnect (the backend may already have acted on them): they fail, and the caller decides.
   */
  Herald.prototype.rpc = function (method, data, options) {
    var self = this;
    options = options || {};
    var requestId = this._prefix + "rpc-" + (++this._nextId);
    return new Promise(function (resolve, reject) {
      if (!self.authorized) { reject(new Error("not-connected")); return; }
      var call = {resolve: resolve, reject: reject, timer: null};
      // A client-side deadline as well as the server's rpc.timeout-ms, in case the socket silently dies.
      var timeout = options.timeout != null ? options.timeout : 30000;
      if (timeout > 0) {
        call.timer = setTimeout(function () {
          delete self._calls[requestId];
          reject(new Error("rpc-timeout"));
        }, timeout);
      }
      self._calls[requestId] = call;
      self._send(JSON.stringify({
        type: "rpc", method: method, data: data === undefined ? null : data, requestId: requestId
      }));
    });
  };

  Herald.prototype._onRpcAnswer = function (msg) {
    var id = String(msg.requestId);
    var call = this._calls[id];
    if (!call) return;   // answered after our own timeout
    delete this._calls[id];
    clearTimeout(call.timer);
    if (msg.code === "success") {
      call.resolve(msg.data);
    } else {
      var err = new Error(msg.message);
      if (msg.status != null) err.status = msg.status;
      call.reject(err);
    }
  };

  Herald.prototype._failCalls = function (reason) {
    var calls = this._calls;
    this._calls = {};
    Object.keys(calls).forEach(function (id) {
      clearTimeout(calls[id].timer);
      calls[id].reject(new Error(reason));
    });
  };

  Herald.prototype.subscriptions = function () {
    var list = [];
    this._forEachSub(function (s) { list.push(s); });
    return list;
  };

  global.Herald = Herald;
  if (typeof module === "object" && module.exports) module.exports = Herald;
})(typeof window !== "undefined" ? window : this);
