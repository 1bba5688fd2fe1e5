// The admin's console: reads the JSON API, renders with DOM calls and textContent only (never HTML strings:
// the page's CSP turns on Trusted Types, so assigning markup would throw), acts with the admin's token.
//
// Live updates: a short poll (every POLL_MS, while the tab is visible) rather than server-sent events. The lists
// are small paged JSON answers the API already has, a poll works through every proxy and load balancer (no
// buffering, no idle timeouts on a long-lived stream), it needs no extra connection per open tab on the server,
// and it recovers from a restart of the server by itself. The one thing that must be live to the line, a running
// job's output, is streamed: fetch() of `logs?follow=1` read chunk by chunk (not EventSource, which cannot send
// the Authorization header).
"use strict";

(() => {
  const POLL_MS = 2000;
  const COLLECTIONS_MS = 30000;
  const PAGE = 100;             // waiting and running jobs read per status and poll (the listing is paged)
  const FINISHED_STEP = 20;     // finished jobs shown at first, and added by "Show older jobs"
  const FINISHED_MAX = 500;
  const FILES_SHOWN = 200;      // file names listed per collection
  const LOG_MAX_CHARS = 200000; // a followed log keeps its last this many characters
  const CONFIRM_MS = 8000;
  const TOKEN_KEY = "dsm-token";
  const WAITING = /^Waiting in line: (\d+) of (\d+); (.*)\.$/s;

  const $ = (id) => document.getElementById(id);
  const state = {
    data: {},                   // the last answer of each section, to render again after a click
    finishedLimit: FINISHED_STEP,
    confirming: null,           // "job:5" or "collection:<name>": a click away from acting
    confirmTimer: null,
    acting: new Set(),          // the same keys, while their request runs
    files: new Map(),           // collection name -> {names, more} | {error}, while shown
    log: null,                  // {id, follow, controller}
    timer: null,
    polling: false,
    again: false,               // asked for while a poll ran: poll once more at once
  };

  // -- the token: kept for this tab only, sent with every request once set

  function token() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch {
      return "";
    }
  }

  function setToken(value) {
    sections.forEach(forget);  // what the last token could read is not shown under the next one
    try {
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch {
      // storage refused (a private window's quota): the token lasts until the page is left
    }
    showToken();
  }

  function showToken() {
    const set = Boolean(token());
    $("forget").hidden = !set;
    $("token-state").textContent = set
      ? "token in use for this tab"
      : "no token: reading only what the server shows without one";
  }

  // -- requests

  class Refusal extends Error {
    constructor(status, reason) {
      super(reason);
      this.status = status;
    }
  }

  async function request(path, options = {}) {
    const headers = { ...(options.headers || {}) };
    const bearer = token();
    if (bearer) headers.Authorization = "Bearer " + bearer;
    let response;
    try {
      response = await fetch(path, { cache: "no-store", signal: options.signal, method: options.method, headers });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new Refusal(0, "the server did not answer");
    }
    if (!response.ok && !(options.answers || []).includes(response.status)) {
      throw new Refusal(response.status, await reasonOf(response));
    }
    return response;
  }

  async function reasonOf(response) {
    let reason = "";
    try {
      const body = await response.json();
      reason = String(body.reason || body.message || "");
    } catch {
      // not JSON: a proxy's page, say
    }
    return `${reason || response.statusText || "refused"} (HTTP ${response.status})`;
  }

  async function getJSON(path, options) {
    return (await request(path, options)).json();
  }

  // -- building the DOM: text is always a Text node or textContent

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else if (key === "onclick") node.addEventListener("click", value);
      else if (key.startsWith("on")) throw new Error("event handlers are added with addEventListener only");
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function cell(label, ...children) {
    return el("td", { "data-label": label }, el("div", null, ...children));
  }

  function actions(...buttons) {
    return el("td", { class: "actions" }, el("div", null, ...buttons));
  }

  function button(text, onclick, props) {
    return el("button", { type: "button", text, onclick, ...(props || {}) });
  }

  // Rows are kept while their data is unchanged, so a poll never swaps a button from under a click.
  function syncRows(tbody, rows) {
    const old = new Map([...tbody.children].map((tr) => [tr.dataset.key, tr]));
    let previous = null;
    for (const row of rows) {
      let tr = old.get(row.key);
      old.delete(row.key);
      if (!tr || tr.dataset.sig !== row.sig) {
        const fresh = row.build();
        fresh.dataset.key = row.key;
        fresh.dataset.sig = row.sig;
        if (tr) tr.replaceWith(fresh);
        tr = fresh;
      }
      const wanted = previous ? previous.nextSibling : tbody.firstChild;
      if (wanted !== tr) tbody.insertBefore(tr, wanted);
      previous = tr;
    }
    for (const tr of old.values()) tr.remove();
    const section = tbody.closest("section");
    const empty = section.querySelector(".empty");
    if (empty) empty.hidden = rows.length > 0;
    tbody.closest("table").hidden = rows.length === 0;
  }

  // -- formatting

  function when(seconds) {
    if (!seconds) return "";
    const date = new Date(seconds * 1000);
    const today = new Date().toDateString() === date.toDateString();
    return today ? date.toLocaleTimeString() : date.toLocaleString();
  }

  function bytes(n) {
    if (n === null || n === undefined) return "";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = Number(n);
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
  }

  function parsed(text) {
    if (!text) return {};
    try {
      const value = JSON.parse(text);
      return value && typeof value === "object" ? value : {};
    } catch {
      return {};
    }
  }

  function service(job) {
    if (job.kind === "tes") return "TES task " + (job.task_id || "");
    return String(job.jobtype || "").replace(/^\/api\//, "");
  }

  // Why a job waits, from the scheduler's note: "Waiting in line: 2 of 5; <reason>."
  function waitOf(job) {
    const match = WAITING.exec(job.message || "");
    if (!match) {
      const note = job.message || (job.status === "created" ? "just submitted" : "not yet placed by the scheduler");
      return { place: null, of: null, reason: note, category: "not yet placed" };
    }
    return { place: Number(match[1]), of: Number(match[2]), reason: match[3], category: category(match[3]) };
  }

  function category(reason) {
    if (/job slots are in use/.test(reason)) return "capacity";
    if (/already runs its maximum/.test(reason)) return "per-service limit";
    if (/GPU/.test(reason)) return "GPU memory";
    return "other";
  }

  // Terminal control sequences (colours, cursor moves) and other control characters that containers print:
  // shown as text they would be stray glyphs.
  const CONTROL = /\x1b\[[0-?]*[ -\/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|[\x00-\x08\x0b-\x1f\x7f]/g;

  function plain(text) {
    return String(text || "").replace(CONTROL, "");
  }

  function tail(text, lines, chars) {
    const kept = plain(text).trimEnd().split("\n").slice(-lines).join("\n");
    return kept.length > chars ? "…" + kept.slice(-chars) : kept;
  }

  function pill(status) {
    const kind = { complete: "ok", error: "bad", pending: "wait", created: "wait", running: "run" }[status] || "";
    return el("span", { class: "pill " + kind, text: status });
  }

  // -- notices and the token banner

  function notice(text, bad) {
    const node = $("notice");
    node.textContent = text;
    node.className = "banner " + (bad ? "bad" : "ok");
    node.hidden = false;
  }

  function refused(errors) {
    const auth = errors.find((e) => e instanceof Refusal && (e.status === 401 || e.status === 403));
    const banner = $("auth");
    if (!auth) {
      banner.hidden = true;
      return;
    }
    let text;
    if (auth.status === 403) text = "The token in use may not read this: " + auth.message;
    else if (token()) text = "The server refused the token in use: " + auth.message;
    else {
      text = "This server needs a token to show its state. Paste one above (an admin makes one with "
        + "`dsm token create --name you --scope read`; cancelling and deleting need --scope admin). "
        + "The server said: " + auth.message;
    }
    banner.textContent = text;
    banner.hidden = false;
  }

  function sectionProblem(id, error) {
    const node = $(id).querySelector(".problem");
    if (!error) {
      node.hidden = true;
      return;
    }
    node.textContent = error.status === 401 || error.status === 403
      ? "Needs a token (see above)."
      : "Could not read this: " + (error.message || String(error));
    node.hidden = false;
  }

  // -- sections

  const sections = [
    {
      id: "queue-section",
      async load() {
        const [created, pending] = await Promise.all([
          getJSON(`jobs/?status=created&order=asc&limit=${PAGE}`),
          getJSON(`jobs/?status=pending&order=asc&limit=${PAGE}`),
        ]);
        return [...created.jobs, ...pending.jobs];
      },
      render: renderQueue,
    },
    {
      id: "running-section",
      load: async () => (await getJSON(`jobs/?status=running&order=asc&limit=${PAGE}`)).jobs,
      render: renderRunning,
    },
    {
      id: "finished-section",
      async load() {
        const limit = state.finishedLimit;
        const [complete, error] = await Promise.all([
          getJSON(`jobs/?status=complete&order=desc&limit=${limit}`),
          getJSON(`jobs/?status=error&order=desc&limit=${limit}`),
        ]);
        // The newest `limit` of both together are within the newest `limit` of each.
        const jobs = [...complete.jobs, ...error.jobs].sort((a, b) => b.id - a.id).slice(0, limit);
        return { jobs, more: complete.jobs.length >= limit || error.jobs.length >= limit };
      },
      render: renderFinished,
    },
    { id: "gpus-section", load: () => getJSON("api/gpus"), render: renderGpus },
    { id: "services-section", load: async () => (await getJSON("api/services")).services, render: renderServices },
    {
      id: "collections-section",
      every: COLLECTIONS_MS,  // each read walks every stored file on the server: not every 2 s
      load: async () => (await getJSON("api/collections")).collections,
      render: renderCollections,
    },
  ];

  function renderQueue(jobs) {
    const rows = jobs.map((job) => ({ job, wait: waitOf(job) }));
    rows.sort((a, b) => (a.wait.place ?? Infinity) - (b.wait.place ?? Infinity) || a.job.id - b.job.id);
    const total = Math.max(rows.length, ...rows.map((r) => r.wait.of || 0));
    const cut = total > rows.length ? `, first ${rows.length} shown` : "";
    $("queue-count").textContent = total ? `(${total}${cut})` : "";
    syncRows($("queue").tBodies[0], rows.map(({ job, wait }) => {
      const key = "job:" + job.id;
      return {
        key: String(job.id),
        sig: JSON.stringify([job, confirmState(key)]),
        build: () => el("tr", { class: "job" },
          cell("Place", wait.place ? `${wait.place} of ${wait.of}` : "—"),
          cell("Job", String(job.id)),
          cell("Service", service(job)),
          cell("Waits for", el("span", { class: "reason " + wait.category.replace(/\W+/g, "-"), text: wait.category })),
          cell("Why", el("span", { class: "msg", text: wait.reason })),
          cell("Submitted", when(job.created_at)),
          actions(...cancelButtons(job))),
      };
    }));
  }

  function renderRunning(jobs) {
    $("running-count").textContent = jobs.length ? `(${jobs.length})` : "";
    syncRows($("running").tBodies[0], jobs.map((job) => {
      const key = "job:" + job.id;
      const following = state.log && state.log.id === job.id && state.log.controller;
      return {
        key: String(job.id),
        sig: JSON.stringify([job, confirmState(key), Boolean(following)]),
        build: () => el("tr", { class: "job" },
          cell("Job", String(job.id)),
          cell("Service", service(job)),
          cell("Submitted", when(job.created_at)),
          cell("Progress", el("span", { class: "msg", text: tail(job.message, 5, 600) })),
          cell("Records", job.processed_records ?? ""),
          actions(
            ...(job.kind === "tes" ? [] : [button(following ? "Following log" : "Follow log",
              () => showLog(job.id, true),
              { "aria-label": `Follow the log of job ${job.id}`, disabled: Boolean(following) })]),
            ...cancelButtons(job))),
      };
    }));
  }

  function renderFinished({ jobs, more }) {
    $("finished-count").textContent = jobs.length ? `(newest ${jobs.length})` : "";
    $("finished-more").hidden = !more || state.finishedLimit >= FINISHED_MAX;
    syncRows($("finished").tBodies[0], jobs.map((job) => {
      const results = parsed(job.results);
      const code = results.returncode ?? results.exit_code;
      const error = tail(results.error, 5, 600);
      const message = tail(job.message, 5, 600);
      // a job stopped by the server has its reason as both its message and the first line of its error
      const note = (message && error.includes(message) ? [error] : [message, error]).filter(Boolean);
      return {
        key: String(job.id),
        sig: JSON.stringify(job),
        build: () => el("tr", { class: "job" },
          cell("Job", String(job.id)),
          cell("Service", service(job)),
          cell("Status", pill(job.status)),
          cell("Ended", when(job.completed_at)),
          cell("Exit code", code === null || code === undefined ? "—" : String(code)),
          cell("Error", ...note.map((text) => el("span", { class: "msg block", text }))),
          actions(...(job.kind === "tes" ? []
            : [button("Log", () => showLog(job.id, false), { "aria-label": `Show the log of job ${job.id}` })]))),
      };
    }));
  }

  function renderGpus(gpus) {
    const box = $("gpus");
    const sig = JSON.stringify(gpus);
    if (box.dataset.sig === sig) return;
    box.dataset.sig = sig;
    const shown = [];
    if (!gpus.enabled || gpus.problem) {
      shown.push(el("p", { class: "muted", text: gpus.problem || "GPUs are not enabled on this server." }));
    }
    for (const card of gpus.cards || []) {
      const total = Number(card.total) || 0;
      const jobs = card.jobs || [];
      shown.push(el("article", { class: "card" },
        el("h3", null, `GPU ${card.id}: `, el("span", { text: card.name || "" })),
        el("p", { class: "muted", text: card.uuid || "" }),
        el("p", null, `used ${bytes(card.used)} of ${bytes(total)}`),
        el("meter", { min: 0, max: total || 1, value: Number(card.used) || 0,
          "aria-label": `GPU ${card.id} memory in use` }),
        el("p", null, `reserved by jobs here: ${bytes(card.reserved)}`),
        el("meter", { min: 0, max: total || 1, value: Number(card.reserved) || 0,
          "aria-label": `GPU ${card.id} memory reserved` }),
        jobs.length
          ? el("ul", null, ...jobs.map((j) => el("li", null, `job ${j.id} (${j.service}): `
            + (j.gpu_memory === null || j.gpu_memory === undefined ? "the whole card" : bytes(j.gpu_memory)))))
          : el("p", { class: "muted", text: "no jobs" })));
    }
    if (gpus.enabled && !(gpus.cards || []).length && !gpus.problem) {
      shown.push(el("p", { class: "muted", text: "No cards found." }));
    }
    box.replaceChildren(...shown);
  }

  function renderServices(services) {
    syncRows($("services").tBodies[0], services.map((s) => ({
      key: s.name,
      sig: JSON.stringify(s),
      build: () => el("tr", null,
        cell("Service", el("strong", { text: s.name })),
        cell("Image", s.image),
        cell("Endpoints", (s.endpoints || []).join(", ")),
        cell("GPU", s.uses_gpu ? (s.gpu_memory ? `yes, ${bytes(s.gpu_memory)}` : "yes") : "no"),
        cell("Running", String(s.running)),
        cell("Waiting", String(s.waiting)),
        cell("Limit", s.max_concurrent ? String(s.max_concurrent) : "—"),
        cell("Recent failures", (s.recent_failures || []).length
          ? el("ul", { class: "failures" }, ...s.recent_failures.map((f) => el("li", null,
            `job ${f.id} (${when(f.completed_at)}, ${f.failure}): `,
            el("span", { class: "msg", text: f.message || "" }))))
          : "none")),
    })));
  }

  function renderCollections(collections) {
    $("collections-count").textContent = collections.length ? `(${collections.length})` : "";
    for (const name of state.files.keys()) {
      if (!collections.some((c) => c.name === name)) state.files.delete(name);
    }
    syncRows($("collections").tBodies[0], collections.map((c) => {
      const key = "collection:" + c.name;
      const files = state.files.get(c.name);
      return {
        key: c.name,
        sig: JSON.stringify([c, confirmState(key), files || null]),
        build: () => el("tr", null,
          cell("Collection", el("span", { class: "name", text: c.name }), files ? fileList(files) : null),
          cell("Files", String(c.files)),
          cell("Size", bytes(c.bytes)),
          cell("Changed", when(c.modified_at)),
          cell("In use", c.in_use ? "yes, by a waiting or running job" : "no"),
          actions(
            button(files ? "Hide files" : "Files", () => toggleFiles(c.name),
              { "aria-label": `List the files of ${c.name}` }),
            ...confirmButtons(key, "Delete", "Delete for good", `collection ${c.name}`,
              () => deleteCollection(c.name)))),
      };
    }));
  }

  function fileList(files) {
    if (files.error) return el("p", { class: "problem", text: files.error });
    if (files.loading) return el("p", { class: "muted", text: "listing…" });
    const list = el("ul", { class: "files" }, ...files.names.map((name) => el("li", { text: name })));
    if (files.more) list.append(el("li", { class: "muted", text: `and ${files.more} more` }));
    if (!files.names.length) list.append(el("li", { class: "muted", text: "no files" }));
    return list;
  }

  // -- actions: each needs a second click within CONFIRM_MS

  function confirmState(key) {
    return state.acting.has(key) ? "acting" : state.confirming === key ? "confirming" : "";
  }

  function confirmButtons(key, label, confirmLabel, what, act) {
    const now = confirmState(key);
    if (now === "acting") return [button(label + "…", null, { disabled: true })];
    if (now === "confirming") {
      return [
        button(confirmLabel, () => {
          stopConfirming();
          state.acting.add(key);
          render();
          act().finally(() => {
            state.acting.delete(key);
            poll();
          });
        }, { class: "danger", "aria-label": `${confirmLabel}: ${what}` }),
        button("Keep", () => stopConfirming(true), { "aria-label": `Keep ${what}` }),
      ];
    }
    return [button(label, () => {
      stopConfirming();
      state.confirming = key;
      state.confirmTimer = setTimeout(() => stopConfirming(true), CONFIRM_MS);
      render();
    }, { "aria-label": `${label} ${what}` })];
  }

  function stopConfirming(redraw) {
    clearTimeout(state.confirmTimer);
    state.confirming = null;
    if (redraw) render();
  }

  // A TES task is read through the TES API, with its client's token; an admin may cancel it here too.
  function cancelButtons(job) {
    return confirmButtons("job:" + job.id, "Cancel", "Cancel now", `job ${job.id}`, () => cancelJob(job.id));
  }

  async function cancelJob(id) {
    try {
      const answer = await (await request(`api/jobs/${id}?by=dashboard`, { method: "DELETE" })).json();
      const job = answer.job || {};
      notice(`Job ${id}: ${job.status === "running" ? "asked to stop" : job.status || "cancelled"}.`, false);
    } catch (error) {
      notice(`Could not cancel job ${id}: ${error.message}`, true);
    }
  }

  async function deleteCollection(name) {
    try {
      await request("api/files/" + encodeURIComponent(name), { method: "DELETE" });
      state.files.delete(name);
      sections.find((s) => s.id === "collections-section").loadedAt = 0;  // show it gone at the next poll
      notice(`Collection ${name} deleted.`, false);
    } catch (error) {
      notice(`Could not delete collection ${name}: ${error.message}`, true);
    }
  }

  async function toggleFiles(name) {
    if (state.files.has(name)) {
      state.files.delete(name);
      render();
      return;
    }
    state.files.set(name, { loading: true });
    render();
    let shown;
    try {
      const tree = await getJSON("api/list_filenames/" + encodeURIComponent(name));
      const names = [];
      for (const [folder, files] of Object.entries(tree)) {
        for (const file of files) names.push(folder === "." ? file : `${folder}/${file}`);
      }
      names.sort();
      shown = { names: names.slice(0, FILES_SHOWN), more: Math.max(0, names.length - FILES_SHOWN) };
    } catch (error) {
      shown = { error: "Could not list the files: " + error.message };
    }
    if (state.files.has(name)) state.files.set(name, shown);
    render();
  }

  // -- the log: stored output of a finished job, or followed live while the job runs

  function stopLog() {
    if (state.log && state.log.controller) state.log.controller.abort();
    if (state.log) state.log.controller = null;
  }

  function logState(text) {
    $("log-state").textContent = text;
  }

  async function showLog(id, follow) {
    stopLog();
    const controller = new AbortController();
    state.log = { id, follow, controller };
    const output = $("log-output");
    const text = document.createTextNode("");
    output.replaceChildren(text);
    $("log-job").textContent = String(id);
    $("log-section").hidden = false;
    $("log-stop").hidden = !follow;
    logState(follow ? "following…" : "loading…");
    render();
    $("log-section").scrollIntoView({ block: "nearest" });
    try {
      const response = await request(`api/jobs/${id}/logs?tail=200${follow ? "&follow=1" : ""}`,
        { signal: controller.signal });
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        append(output, text, decoder.decode(value, { stream: true }));
      }
      append(output, text, decoder.decode());
      if (!text.length) append(output, text, "(no output)");
      logState(follow ? "the job ended; its output is above" : "the stored output (its last 200 lines)");
    } catch (error) {
      if (error.name === "AbortError") {
        if (state.log && state.log.id === id) logState("stopped following");
        return;
      }
      logState("Could not read the log: " + error.message);
    } finally {
      if (state.log && state.log.controller === controller) {
        state.log.controller = null;
        $("log-stop").hidden = true;
        render();
      }
    }
  }

  function append(output, text, chunk) {
    if (!chunk) return;
    const atEnd = output.scrollTop + output.clientHeight >= output.scrollHeight - 8;
    text.appendData(plain(chunk.replace(/\r(?!\n)/g, "\n")));  // a progress bar's redraws, one per line
    if (text.length > LOG_MAX_CHARS) text.deleteData(0, text.length - LOG_MAX_CHARS);
    if (atEnd) output.scrollTop = output.scrollHeight;
  }

  // -- the poll

  function renderHealth(health) {
    const pillNode = $("health");
    const ok = health.status === "ok";
    pillNode.textContent = ok ? "healthy" : "problem: " + (health.message || health.status);
    pillNode.className = "pill " + (ok ? "ok" : "bad");
    const counts = (health.database && health.database.jobs) || {};
    const engine = health.engine || health.docker || {};
    const gpu = health.gpu || {};
    const parts = [
      "Jobs: " + (Object.entries(counts).map(([k, v]) => `${k} ${v}`).join(", ") || "none"),
      `instance ${health.instance || "?"}`,
      `${engine.backend || "engine"} ${engine.ok ? "reachable" : "unreachable"}`,
      `GPU ${gpu.enabled ? (gpu.ok === false ? "unavailable" : gpu.source || "enabled") : "disabled"}`,
    ];
    $("summary").textContent = parts.join(" · ");
  }

  function render() {
    for (const section of sections) {
      if (section.id in state.data) section.render(state.data[section.id]);
    }
  }

  // A section with `every` is read at most that often; between reads it shows what it last read.
  function load(section) {
    const now = Date.now();
    if (section.every && section.id in state.data && now - (section.loadedAt || 0) < section.every) {
      return Promise.resolve(state.data[section.id]);
    }
    return section.load().then((value) => {
      section.loadedAt = now;
      return value;
    });
  }

  function forget(section) {
    delete state.data[section.id];  // show nothing the token may no longer read
    section.loadedAt = 0;
    const table = $(section.id) && $(section.id).querySelector("tbody");
    if (table) syncRows(table, []);
    if (section.id === "gpus-section") $("gpus").replaceChildren();
  }

  async function poll() {
    clearTimeout(state.timer);
    if (state.polling) {
      state.again = true;
      return;
    }
    state.polling = true;
    state.again = false;
    const errors = [];
    try {
      const [health, ...results] = await Promise.allSettled([
        getJSON("api/health", { answers: [503] }),  // an unhealthy server says what is wrong, with a 503
        ...sections.map(load),
      ]);
      if (health.status === "fulfilled") renderHealth(health.value);
      else {
        errors.push(health.reason);
        const pillNode = $("health");
        pillNode.textContent = health.reason.status === 0 ? "server unreachable"
          : health.reason.status === 401 || health.reason.status === 403 ? "needs a token" : "unknown";
        pillNode.className = "pill bad";
        $("summary").textContent = "";
      }
      sections.forEach((section, i) => {
        const result = results[i];
        if (result.status === "fulfilled") {
          state.data[section.id] = result.value;
          sectionProblem(section.id, null);
          section.render(result.value);
        } else {
          errors.push(result.reason);
          sectionProblem(section.id, result.reason);
          if (result.reason.status === 401 || result.reason.status === 403) forget(section);
        }
      });
      if (errors.some((e) => e.status === 401)) {
        // a token refused now: sections read earlier and kept a while (collections) go too, not in 30 s
        sections.filter((section) => section.every).forEach(forget);
      }
      refused(errors);
      const stamp = new Date().toLocaleTimeString();
      $("updated").textContent = errors.length
        ? `Last tried ${stamp}; some parts could not be read. Updates every ${POLL_MS / 1000} s.`
        : `Updated ${stamp}; updates every ${POLL_MS / 1000} s while this tab is visible.`;
    } finally {
      state.polling = false;
      if (state.again) poll();
      else if (!document.hidden) state.timer = setTimeout(poll, POLL_MS);
    }
  }

  // -- wiring

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("token");
    const value = input.value.trim().replace(/^bearer\s+/i, "");  // pasted with its header's word
    input.value = "";
    if (!value) return;
    setToken(value);
    notice("Token set for this tab.", false);
    poll();
  });
  $("forget").addEventListener("click", () => {
    setToken("");
    stopLog();
    notice("Token forgotten.", false);
    poll();
  });
  $("finished-more").addEventListener("click", () => {
    state.finishedLimit = Math.min(FINISHED_MAX, state.finishedLimit + FINISHED_STEP);
    poll();
  });
  $("log-stop").addEventListener("click", () => {
    stopLog();
    render();
  });
  $("log-close").addEventListener("click", () => {
    stopLog();
    state.log = null;
    $("log-section").hidden = true;
    $("log-output").replaceChildren();
    render();
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) poll();
  });

  showToken();
  poll();
})();
