// dreamr live page: one WebSocket to /ws, protocol v1 (see the package docstring / schema.json).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  const state = {
    ws: null, ready: false, running: null, image: null, puzzle: null, puzzleSeq: 0,
    tasks: [], limits: null, retries: 0, seq: 0, pending: new Map(), tau: 1,
    startedAt: 0, ticker: null, counts: { steps: 0, draft: 0, target: 0, repaired: 0, cache: 0, rejected: 0 },
  };

  // ------------------------------------------------------------------ connection
  function wsUrl() {
    const url = new URL("/ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    if (token) url.searchParams.set("token", token);
    return url.href;
  }

  function setConn(kind, text) {
    $("conn").dataset.state = kind;
    $("conn-text").textContent = text;
  }

  function connect() {
    setConn("connecting", "Connecting…");
    const ws = new WebSocket(wsUrl());
    state.ws = ws;
    ws.addEventListener("message", (e) => {
      let msg;
      try { msg = JSON.parse(e.data); } catch { return; }
      handle(msg);
    });
    ws.addEventListener("close", (e) => {
      state.ready = false;
      if (state.running) finish("error", "The connection was lost; the request stopped.");
      updateButtons();
      if (e.code === 1000 && (e.reason || "").startsWith("idle")) {
        // the server closes connections that ask nothing for a while (--idle-timeout): an open
        // page is not a fault, so it reconnects at once and quietly
        connect();
        return;
      }
      const why = e.code === 1009 ? "the image is too large for this server" : (e.reason || `code ${e.code}`);
      const wait = Math.min(10000, 500 * 2 ** state.retries++);
      setConn("down", `Disconnected (${why}); retrying in ${Math.round(wait / 1000)} s`);
      setTimeout(connect, wait);
    });
  }

  const authHeaders = () => (token ? { Authorization: `Bearer ${token}` } : {});

  // ------------------------------------------------------------------ tasks (GET /tasks)
  // The picker shows only when the server serves more than one task; with one, requests name
  // none and the server's default answers, as it always did.
  function pickedTask() {
    return state.tasks.length > 1 ? $("task").value : null;
  }

  async function loadTasks() {
    try {
      const res = await fetch("/tasks", { headers: authHeaders() });
      if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
      const served = await res.json();
      state.tasks = served.tasks;
      $("task").replaceChildren(...served.tasks.map((t) => {
        const option = document.createElement("option");
        option.value = t.name;
        option.textContent = `${t.name}: ${t.title}`;
        option.selected = t.name === served.default;
        return option;
      }));
    } catch {
      state.tasks = []; // the page works without the list: the server's default task answers
    }
    $("task-field").hidden = state.tasks.length < 2;
  }

  function taskChanged() {
    const picked = state.tasks.find((t) => t.name === $("task").value);
    if (picked) announce(`Task: ${picked.title}`);
    // another task's demo puzzle is no question for this task's models: take one of this task's
    if (state.puzzle && state.puzzle.task !== $("task").value) demoPuzzle();
  }

  function send(message) {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
    state.ws.send(JSON.stringify({ v: 1, ...message }));
    return true;
  }

  // ------------------------------------------------------------------ rendering
  const fmtRatio = (r) => {
    if (typeof r === "string") return r.includes("inf") ? "∞" : r;
    if (r >= 1000) return r.toExponential(1);
    return r >= 10 ? r.toFixed(1) : r.toPrecision(2);
  };
  const secs = (s) => (s == null ? "–" : `${s.toFixed(2)} s`);

  function announce(text) {
    const p = document.createElement("p");
    p.textContent = text;
    $("announce").append(p);
    while ($("announce").childElementCount > 5) $("announce").firstElementChild.remove();
  }

  function status(text, kind = "") {
    $("status").textContent = text;
    $("status").dataset.kind = kind;
  }

  function row(index, kind, badge, text, meta = "") {
    const li = document.createElement("li");
    li.className = `step ${kind}`;
    li.dataset.index = String(index);
    li.dataset.state = kind.startsWith("pending") ? "pending" : "done";
    li.dataset.t = String(performance.now());
    const num = document.createElement("span");
    num.className = "num";
    num.textContent = `#${index + 1}`;
    const b = document.createElement("span");
    b.className = `badge ${badge.cls}`;
    b.textContent = badge.text;
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    const m = document.createElement("span");
    m.className = "meta";
    m.textContent = meta;
    li.append(num, b, body, m);
    return li;
  }

  function place(li, replacing) {
    if (replacing && replacing.isConnected) replacing.replaceWith(li);
    else $("steps").append(li);
  }

  function verdictMeta(v, t) {
    if (!v) return secs(t);
    const cmp = v.accepted ? "≥" : "<";
    return `ratio ${fmtRatio(v.ratio)} ${cmp} τ ${fmtRatio(v.tau)} · ${secs(t)}`;
  }

  // every step shows as pending until it is done: a "thinking" row until a draft (or the target) replaces it
  function ensurePending(index) {
    if (state.pending.has(index)) return;
    const li = row(index, "pending thinking", { cls: "pending", text: "thinking" }, "…");
    $("steps").append(li);
    state.pending.set(index, li);
  }

  function settle(index) {
    state.pending.delete(index);
  }

  // ------------------------------------------------------------------ "Thinking…" / "Thought for N s"
  const duration = (s) => (s < 10 ? `${s.toFixed(1)} s` : `${Math.round(s)} s`);

  function tally() {
    const c = state.counts;
    const parts = [`${c.steps} step${c.steps === 1 ? "" : "s"}`];
    for (const [key, label] of [["draft", "draft ✓"], ["target", "target"], ["repaired", "repaired"], ["cache", "cache ✓"], ["rejected", "rejected"]]) {
      if (c[key]) parts.push(`${c[key]} ${label}`);
    }
    return parts.join(" · ");
  }

  function thinking() {
    const s = (performance.now() - state.startedAt) / 1000;
    $("thoughts-title").textContent = `Thinking… ${duration(s)} · ${tally()}`;
  }

  function startThoughts() {
    state.counts = { steps: 0, draft: 0, target: 0, repaired: 0, cache: 0, rejected: 0 };
    state.startedAt = performance.now();
    const box = $("thoughts");
    box.hidden = false;
    box.open = true;
    box.dataset.state = "thinking";
    thinking();
    clearInterval(state.ticker);
    state.ticker = setInterval(thinking, 250);
  }

  function stopThoughts(title, collapse) {
    clearInterval(state.ticker);
    state.ticker = null;
    const box = $("thoughts");
    box.dataset.state = collapse ? "thought" : "stopped";
    $("thoughts-title").textContent = title;
    if (collapse) box.open = false; // the answer is what matters now; one click shows the steps again
  }

  function count(key) {
    state.counts[key] += 1;
    if (key !== "rejected") state.counts.steps += 1;
  }

  function dropStaleDrafts(after) {
    for (const [i, li] of state.pending) {
      if (i > after) { li.remove(); state.pending.delete(i); }
    }
  }

  function handle(msg) {
    if (msg.type === "hello") {
      state.ready = true;
      state.retries = 0;
      state.limits = msg.limits;
      setConn("up", `Connected · ${msg.server} ${msg.version}`);
      updateButtons();
      return;
    }
    if (msg.type === "error" && (!state.running || (msg.id && msg.id !== state.running))) {
      showFormError(msg.message);
      return;
    }
    if (!state.running || msg.id !== state.running) return;
    switch (msg.type) {
      case "queued":
        status(`Queued: position ${msg.position}…`);
        break;
      case "started":
        status("Reasoning…");
        state.startedAt = performance.now();
        ensurePending(0);
        break;
      case "drafted": {
        const li = row(msg.index, "pending", { cls: "pending", text: "drafting" }, msg.text, secs(msg.elapsed_s));
        place(li, state.pending.get(msg.index));
        state.pending.set(msg.index, li);
        break;
      }
      case "verified": {
        const s = msg.step;
        const cache = s.source === "cache";
        const li = row(s.index, `verified ${cache ? "cache" : ""} ${s.is_final ? "final" : ""}`,
          { cls: cache ? "cache" : "draft", text: cache ? "cache ✓" : "draft ✓" }, s.text, verdictMeta(s.verdict, msg.elapsed_s));
        li.dataset.verifiedAt = String(performance.now());
        place(li, state.pending.get(s.index));
        settle(s.index);
        count(cache ? "cache" : "draft");
        if (!s.is_final) ensurePending(s.index + 1);
        announce(`Step ${s.index + 1} verified: ${s.text}`);
        break;
      }
      case "rejected": {
        const li = row(msg.index, "rejected", { cls: "rejected", text: "rejected" }, "", verdictMeta(msg.verdict, msg.elapsed_s));
        const del = document.createElement("del");
        del.textContent = msg.text;
        li.querySelector(".text").append(del);
        place(li, state.pending.get(msg.index));
        settle(msg.index);
        dropStaleDrafts(msg.index);
        count("rejected");
        ensurePending(msg.index); // the target writes (or repairs) this step now
        announce(`Draft for step ${msg.index + 1} rejected`);
        break;
      }
      case "fallback": {
        const s = msg.step;
        const repaired = s.kept != null;
        const badge = repaired ? { cls: "repaired", text: "repaired" } : { cls: "target", text: "target" };
        const meta = repaired ? `kept ${s.kept.length} chars of the draft · ${secs(msg.elapsed_s)}` : secs(msg.elapsed_s);
        const li = row(s.index, `fallback ${repaired ? "repaired" : ""} ${s.is_final ? "final" : ""}`, badge, s.text, meta);
        li.dataset.verifiedAt = String(performance.now());
        place(li, state.pending.get(s.index));
        settle(s.index);
        dropStaleDrafts(s.index);
        count(repaired ? "repaired" : "target");
        if (!s.is_final) ensurePending(s.index + 1);
        announce(`Step ${s.index + 1} ${repaired ? "repaired" : "written"} by the target: ${s.text}`);
        break;
      }
      case "cache_hit": {
        const li = document.createElement("li");
        li.className = "step note";
        li.textContent = `Trajectory cache hit: ${msg.steps} step${msg.steps === 1 ? "" : "s"} proposed from an earlier run (each is verified again).`;
        $("steps").append(li);
        break;
      }
      case "answer":
        dropStaleDrafts(-1);
        stopThoughts(`Thought for ${duration(msg.elapsed_s)} · ${tally()}`, true);
        showAnswer(msg.answer);
        break;
      case "stats":
        showStats(msg);
        finish("done", `Done in ${secs(msg.stats.wall_s)}.`);
        break;
      case "error":
        finish("error", `Error (${msg.code}): ${msg.message}`);
        break;
      case "cancelled":
        finish("cancelled", "Stopped.");
        break;
      default:
        break;
    }
  }

  function showAnswer(answer) {
    const box = $("answer");
    box.hidden = false;
    box.dataset.t = String(performance.now());
    $("answer-text").textContent = answer ?? "(no answer)";
    const check = $("answer-check");
    check.className = "answer-check";
    check.textContent = "";
    const expected = state.puzzle ? state.puzzle.answer : null; // a demo puzzle's known answer
    if (expected != null) {
      const ok = answer != null && answer.trim() === expected;
      check.classList.add(ok ? "ok" : "bad");
      check.textContent = ok ? "✓ matches the puzzle's answer" : `✗ the puzzle's answer is ${expected}`;
    }
    announce(`Answer: ${answer ?? "none"}`);
  }

  function showStats(msg) {
    const s = msg.stats;
    const by = s.steps_by_source || {};
    const items = [
      ["Total time", secs(s.wall_s)],
      ["First step", secs(s.time_to_first_step_s)],
      ["Drafts accepted", s.draft_steps_judged ? `${s.draft_steps_accepted} / ${s.draft_steps_judged} (${Math.round(100 * msg.acceptance_rate)}%)` : "–"],
      ["Steps: draft / target / cache", `${by.draft || 0} / ${by.target || 0} / ${by.cache || 0}`],
      ["Target forwards", String(s.target_forwards)],
      ["Draft forwards", String(s.draft_forwards)],
      ["Queue wait", secs(msg.queue_wait_s)],
    ];
    const dl = $("stats");
    dl.replaceChildren(...items.map(([k, v]) => {
      const div = document.createElement("div");
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = v;
      div.append(dt, dd);
      return div;
    }));
    dl.hidden = false;
  }

  // ------------------------------------------------------------------ requests
  function reset() {
    $("steps").replaceChildren();
    state.pending.clear();
    startThoughts();
    $("answer").hidden = true;
    $("stats").hidden = true;
    showFormError("");
  }

  function finish(kind, text) {
    state.running = null;
    dropStaleDrafts(-1); // drafts never verified (stopped, failed, or drafted past the answer)
    if (state.ticker) stopThoughts(`${kind === "error" ? "Failed" : "Stopped"} after ${duration((performance.now() - state.startedAt) / 1000)} · ${tally()}`, false);
    status(text, kind === "error" ? "error" : "");
    if (kind !== "done") announce(text);
    updateButtons();
  }

  function showFormError(text) {
    $("form-error").textContent = text;
    $("form-error").hidden = !text;
  }

  function updateButtons() {
    $("go").disabled = !state.ready || !!state.running;
    $("stop").disabled = !state.running;
    $("demo").disabled = false;
  }

  function ask(event) {
    event.preventDefault();
    const question = $("question").value.trim();
    if (!state.image) { showFormError("Choose an image or take a demo puzzle first."); return; }
    if (!question) { showFormError("Type a question."); $("question").focus(); return; }
    const limit = state.limits ? state.limits.max_message_bytes : Infinity;
    if (state.image.length + question.length + 512 > limit) {
      showFormError(`The image is too large for this server (limit ${(limit / 2 ** 20).toFixed(1)} MiB).`);
      return;
    }
    reset();
    const id = `p${++state.seq}`;
    const tauText = $("tau").value.trim();  // empty: the server's (the model's recommended) threshold
    const tau = Number(tauText);
    const options = { method: $("method").value, drafts: $("show-drafts").checked };
    if (tauText !== "" && Number.isFinite(tau) && tau >= 0) options.tau = tau;
    const message = { type: "ask", id, image: state.image, question, options };
    const task = pickedTask();
    if (task) message.task = task;
    if (!send(message)) {
      showFormError("Not connected yet; try again in a moment.");
      return;
    }
    state.running = id;
    status("Sent…");
    updateButtons();
  }

  function stop() {
    if (state.running) send({ type: "cancel" });
  }

  // ------------------------------------------------------------------ images
  // puzzle: GET /puzzle's answer (task, title, question, answer) for a demo puzzle; null for the user's image
  function setImage(dataUrl, puzzle = null) {
    state.image = dataUrl;
    state.puzzle = puzzle;
    const img = $("preview");
    img.src = dataUrl;
    img.hidden = false;
    // said from the puzzle's own task (its title says what its images show), never assumed
    img.alt = puzzle ? `demo puzzle of the ${puzzle.task} task: ${puzzle.title}` : "your image";
    $("drop").classList.add("has-image");
    $("drop-text").replaceChildren();
    $("drop-text").append("Drop another image, or ");
    const link = document.createElement("span");
    link.className = "link";
    link.textContent = "choose a file";
    $("drop-text").append(link);
    $("expected").hidden = !puzzle;
    $("expected").textContent = puzzle ? `Demo ${puzzle.task} puzzle (${puzzle.title}): the known answer is ${puzzle.answer}.` : "";
  }

  function readFile(file) {
    if (!file) return;
    if (!file.type.startsWith("image/")) { showFormError(`${file.name} is not an image.`); return; }
    const max = state.limits ? state.limits.max_image_bytes : Infinity;
    if (file.size > max) { showFormError(`${file.name} is over the ${(max / 2 ** 20).toFixed(1)} MiB limit.`); return; }
    const reader = new FileReader();
    reader.addEventListener("load", () => { showFormError(""); setImage(String(reader.result)); });
    reader.addEventListener("error", () => showFormError(`Could not read ${file.name}.`));
    reader.readAsDataURL(file);
  }

  async function demoPuzzle() {
    $("demo").disabled = true;
    const mine = ++state.puzzleSeq; // a newer ask (the task changed meanwhile) wins over this one
    const task = pickedTask();
    try {
      const res = await fetch(task ? `/puzzle?task=${encodeURIComponent(task)}` : "/puzzle", { headers: authHeaders() });
      if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
      const p = await res.json();
      if (mine !== state.puzzleSeq) return;
      setImage(p.image, p);
      $("question").value = p.question;
      showFormError("");
      announce(`Demo puzzle loaded: ${p.question}`);
    } catch (e) {
      if (mine === state.puzzleSeq) showFormError(`Could not get a demo puzzle: ${e.message}`);
    } finally {
      if (mine === state.puzzleSeq) $("demo").disabled = false;
    }
  }

  // ------------------------------------------------------------------ wiring
  function wire() {
    $("ask-form").addEventListener("submit", ask);
    $("stop").addEventListener("click", stop);
    $("demo").addEventListener("click", demoPuzzle);
    $("task").addEventListener("change", taskChanged);
    $("file").addEventListener("change", (e) => readFile(e.target.files[0]));
    const drop = $("drop");
    ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
    ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
    drop.addEventListener("drop", (e) => { e.preventDefault(); readFile(e.dataTransfer.files[0]); });
    document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.running) stop(); });
    loadTasks();
    connect();
  }

  wire();
})();
