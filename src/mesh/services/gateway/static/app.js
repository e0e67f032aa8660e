// The mesh's web page: plain JavaScript against the REST API, no build step.
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = {
  imageId: null, imageUrl: null, jobs: new Map(), streams: new Map(), selectedJob: null,
  uploading: false, submitting: false, submission: null, resultCall: 0, originalUrl: null, healthAt: null,
};
const TERMINAL = new Set(["SUCCEEDED", "FAILED", "DEAD", "CANCELLED"]);
const RETRYABLE = new Set(["FAILED", "DEAD", "CANCELLED"]);

function apiKey() { return localStorage.getItem("mesh.apiKey") || ""; }

function authHeaders(extra = {}) {
  const headers = { ...extra };
  if (apiKey()) headers["X-API-Key"] = apiKey();
  return headers;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers || {}) });
  const body = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.error ? `${body.error.code}: ${body.error.message}` : `HTTP ${response.status}`;
    const error = new Error(message);
    error.code = body && body.error ? body.error.code : "";
    throw error;
  }
  return body;
}

// Hex of 16 random bytes: crypto.randomUUID exists only in secure contexts, and the page is often plain http.
function newKey() {
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

function time(date) { return date.toLocaleTimeString(); }

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

// ---- Upload (drag and drop, XHR for progress) ----
function setupUpload() {
  const zone = $("#drop-zone");
  const input = $("#file-input");
  zone.addEventListener("click", () => { if (!state.uploading) input.click(); });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); if (!state.uploading) input.click(); }
  });
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (event.dataTransfer.files.length) upload(event.dataTransfer.files[0]);
  });
  input.addEventListener("change", () => {
    if (input.files.length) upload(input.files[0]);
    // Emptied, so that choosing the same file again (after a refused or ignored one) is a change too.
    input.value = "";
  });
}

// Submit waits for a photo, for an upload under way (whose photo the job is meant for) and for the last submit.
function updateSubmit() {
  const button = $("#submit-job");
  button.disabled = !state.imageId || state.uploading || state.submitting;
  if (state.submitting) button.setAttribute("aria-busy", "true");
  else button.removeAttribute("aria-busy");
}

function setUploading(on) {
  state.uploading = on;
  const zone = $("#drop-zone");
  for (const name of ["aria-disabled", "aria-busy"]) {
    if (on) zone.setAttribute(name, "true");
    else zone.removeAttribute(name);
  }
  updateSubmit();
}

function upload(file) {
  // Two uploads at once raced, and the one that ended last became the jobs' photo, whichever was chosen last.
  if (state.uploading) return;
  const progress = $("#upload-progress");
  const status = $("#upload-status");
  progress.hidden = false;
  progress.value = 0;
  status.textContent = `Uploading ${file.name}…`;
  setUploading(true);
  // Every file goes as the raw body, which the gateway streams on to the file service as it arrives. Its type
  // is left to the file service to detect from the bytes: file.type is the browser's guess from the name, so
  // a PNG saved as .jpg declared image/jpeg was refused, and a page's user cannot change what it declares.
  const xhr = new XMLHttpRequest();
  xhr.open("POST", `/v1/images?filename=${encodeURIComponent(file.name)}`);
  xhr.setRequestHeader("Content-Type", "application/octet-stream");
  for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
  xhr.upload.addEventListener("progress", (event) => {
    if (event.lengthComputable) progress.value = Math.round((event.loaded / event.total) * 100);
  });
  // A failed upload's bar went on saying 100 %.
  const failed = (reason) => {
    progress.hidden = true;
    progress.value = 0;
    // A failed upload leaves the earlier photo selected: say so, or its preview reads as this file's.
    const kept = state.imageId ? ` Jobs still use the photo shown below (${$("#preview-caption").textContent.split(" · ")[0]}).` : "";
    status.textContent = `Upload failed: ${reason}.${kept}`;
  };
  xhr.addEventListener("loadend", () => setUploading(false));
  xhr.addEventListener("load", () => {
    let body = null;
    try { body = JSON.parse(xhr.responseText); } catch (_) { body = null; }
    if (xhr.status !== 201) {
      failed((body && body.error ? body.error.message : `HTTP ${xhr.status}`).replace(/\.$/, ""));
      return;
    }
    progress.value = 100;
    state.imageId = body.id;
    if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
    state.imageUrl = URL.createObjectURL(file);
    $("#preview-image").src = state.imageUrl;
    $("#preview-caption").textContent = `${body.filename} · ${body.width}×${body.height} · ${body.format} · id ${body.id}`;
    $("#upload-preview").hidden = false;
    status.textContent = body.deduplicated ? "Uploaded (already stored: same bytes)." : "Uploaded.";
  });
  xhr.addEventListener("error", () => failed("the network request failed"));
  xhr.send(file);
}

// ---- Filters and models ----
function paramInput(filter, param) {
  const id = `param-${filter.name}-${param.name}`;
  let input;
  if (param.type === "enum") {
    input = el("select", { id, "data-param": param.name, "data-type": "enum" },
      ...param.options.map((option) => el("option", { value: option, selected: option === param.default }, option)));
  } else if (param.type === "bool") {
    input = el("input", { id, type: "checkbox", "data-param": param.name, "data-type": "bool", checked: param.default === true });
  } else {
    input = el("input", {
      id, type: "number", "data-param": param.name, "data-type": param.type,
      min: param.min ?? undefined, max: param.max ?? undefined,
      step: param.step || (param.type === "int" ? 1 : "any"), value: param.default ?? "",
    });
  }
  return el("label", { for: id, title: param.description }, `${param.name} `, input);
}

async function loadFilters() {
  const container = $("#filters");
  try {
    const body = await api("/v1/filters");
    container.replaceChildren(...body.filters.map((filter) => {
      const id = `filter-${filter.name}`;
      const params = el("div", { class: "params" }, ...filter.params.map((param) => paramInput(filter, param)));
      // An unchosen filter's fields are disabled: the browser then leaves them out of the form's checks, so
      // a value out of range in a filter that is not sent cannot block the submit.
      const setEnabled = (on) => params.querySelectorAll("[data-param]").forEach((input) => { input.disabled = !on; });
      setEnabled(false);
      return el("div", { class: "filter", "data-filter": filter.name },
        el("input", { type: "checkbox", id, value: filter.name, onchange: (event) => setEnabled(event.target.checked) }),
        el("label", { for: id }, ` ${filter.name} `),
        el("span", { class: "muted" }, `${filter.description} (${filter.devices.join(", ")})`),
        params);
    }));
    if (!body.filters.length) container.replaceChildren(el("p", { class: "muted" }, "No filters."));
  } catch (error) {
    container.replaceChildren(el("p", { class: "status-failing" }, `Filters unavailable: ${error.message}`));
  }
}

async function loadModels() {
  const select = $("#model-select");
  try {
    const body = await api("/v1/models");
    // Loaded again whenever the API key changes: the list is replaced, not added to.
    const chosen = select.options.length > 1 ? select.value : "strip-reader";
    select.replaceChildren(el("option", { value: "" }, "none"), ...body.models.map((model) => {
      const label = `${model.name} (v${model.default_version}${model.ready ? "" : ", not ready"})`;
      return el("option", { value: model.name, selected: model.name === chosen }, label);
    }));
    if ($("#submit-status").textContent.startsWith("Models unavailable")) $("#submit-status").textContent = "";
  } catch (error) {
    $("#submit-status").textContent = `Models unavailable: ${error.message}`;
  }
}

function pipeline() {
  const steps = [];
  for (const row of document.querySelectorAll("#filters .filter")) {
    if (!row.querySelector("input[type=checkbox][value]").checked) continue;
    const params = {};
    for (const input of row.querySelectorAll("[data-param]")) {
      const type = input.dataset.type;
      if (type === "bool") params[input.dataset.param] = input.checked;
      else if (type === "enum") params[input.dataset.param] = input.value;
      else if (input.value !== "") params[input.dataset.param] = type === "int" ? parseInt(input.value, 10) : parseFloat(input.value);
    }
    steps.push({ filter: row.dataset.filter, params });
  }
  return steps;
}

async function submitJob(event) {
  event.preventDefault();
  // A double click submitted twice: two jobs for one photo.
  if (state.submitting || state.uploading) return;
  const status = $("#submit-status");
  if (!state.imageId) { status.textContent = "Upload an image first."; return; }
  const body = JSON.stringify({
    image_id: state.imageId,
    pipeline: pipeline(),
    model: $("#model-select").value,
    priority: parseInt($("#priority").value || "0", 10),
  });
  // A submit that got no answer (the network failed, the gateway was restarting) may have queued its job all
  // the same: sent again unchanged, it carries the same key and gets that job back, not a second one. An
  // answered submit, or another form, makes a new key, so that submitting the same form again is a new job.
  if (!state.submission || state.submission.body !== body) state.submission = { body, key: newKey() };
  state.submitting = true;
  updateSubmit();
  try {
    const job = await api("/v1/jobs", {
      method: "POST", headers: { "Content-Type": "application/json", "Idempotency-Key": state.submission.key }, body,
    });
    state.submission = null;
    status.textContent = `Submitted job ${job.id.slice(0, 8)}.`;
    state.selectedJob = job.id;
    showJob(job);
    watch(job.id);
  } catch (error) {
    status.textContent = `Submit failed: ${error.message}`;
  } finally {
    state.submitting = false;
    updateSubmit();
  }
}

// ---- Live queue: Server-Sent Events for the jobs this page works with, polling for the rest ----
// A browser opens at most 6 HTTP/1.1 connections to one host, and each event stream holds one for as long as
// its job lives: a stream per listed job stalled every upload and call behind a busy queue. So at most
// MAX_STREAMS jobs (the ones submitted, cancelled or retried here, newest first) stream, and the list is
// polled every QUEUE_POLL_MS.
const MAX_STREAMS = 3;
const QUEUE_POLL_MS = 3000;

function watch(jobId) {
  if (state.streams.has(jobId)) return;
  if (state.streams.size >= MAX_STREAMS) {
    const [oldest, source] = state.streams.entries().next().value;
    source.close();
    state.streams.delete(oldest);
  }
  const params = apiKey() ? `?api_key=${encodeURIComponent(apiKey())}` : "";
  const source = new EventSource(`/v1/jobs/${jobId}/events${params}`);
  state.streams.set(jobId, source);
  source.addEventListener("job", (event) => showJob(JSON.parse(event.data)));
  const stop = () => { source.close(); state.streams.delete(jobId); };
  source.addEventListener("end", stop);
  source.addEventListener("error", (event) => {
    // A server-sent "error" event carries a body; a connection error has none and EventSource reconnects
    // by itself with Last-Event-ID, unless the (re)connect was answered with another status than 200 (429,
    // 401, 503): then the browser has closed it for good, and the job goes back to the polled list.
    if (event.data || source.readyState === EventSource.CLOSED) { stop(); }
  });
}

function actionButton(label, jobId, action) {
  const button = el("button", {
    type: "button", class: "secondary", "data-action": action,
    "aria-label": `${label} job ${jobId.slice(0, 8)}`,
    onclick: async () => {
      // Busy until answered (a second Retry was refused as FAILED_PRECONDITION). aria-disabled, not disabled:
      // a disabled button loses the keyboard focus.
      if (button.getAttribute("aria-disabled") === "true") return;
      button.setAttribute("aria-disabled", "true");
      button.setAttribute("aria-busy", "true");
      try {
        const job = await api(`/v1/jobs/${jobId}:${action}`, { method: "POST" });
        showJob(job);
        if (!TERMINAL.has(job.state)) watch(jobId);
      } catch (error) {
        $("#submit-status").textContent = `${label} failed: ${error.message}`;
      } finally {
        button.removeAttribute("aria-disabled");
        button.removeAttribute("aria-busy");
      }
    },
  }, label);
  return button;
}

// The buttons a job's row offers, as a word each ("cancel", "retry show").
function actionsOf(job) {
  const actions = [];
  if (!TERMINAL.has(job.state)) actions.push("cancel");
  if (RETRYABLE.has(job.state)) actions.push("retry");
  if (TERMINAL.has(job.state)) actions.push("show");
  return actions.join(" ");
}

function actionButtons(job) {
  const short = job.id.slice(0, 8);
  return actionsOf(job).split(" ").filter(Boolean).map((action) => {
    if (action === "cancel") return actionButton("Cancel", job.id, "cancel");
    if (action === "retry") return actionButton("Retry", job.id, "retry");
    // The job as it is when clicked: the row keeps this button while the job changes.
    return el("button", {
      type: "button", class: "secondary", "data-action": "show", "aria-label": `Show result of job ${short}`,
      onclick: () => selectResult(state.jobs.get(job.id) || job),
    }, "Show");
  });
}

function newRow(job) {
  const short = job.id.slice(0, 8);
  return el("tr", { "data-job": job.id },
    el("td", {}, el("code", { title: job.id }, short)),
    el("td", { class: "work" }),
    el("td", { class: "state" }),
    el("td", { class: "position" }),
    el("td", {}, el("progress", { max: "1", value: "0", "aria-label": `Progress of job ${short}` })),
    el("td", { class: "attempt" }),
    el("td", { class: "actions" }));
}

// What a job does, in the order it runs: its filters, then its model ("grayscale → strip-reader").
function workOf(job) {
  return [...(job.pipeline || []).map((step) => step.filter), ...(job.model ? [job.model] : [])].join(" → ");
}

function showJob(job) {
  // A polled list fetched before a stream's newer event must not turn the row back (ISO times compare as text).
  const known = state.jobs.get(job.id);
  if (known && known.updated_at > job.updated_at) return;
  state.jobs.set(job.id, job);
  const tbody = $("#queue tbody");
  let row = tbody.querySelector(`tr[data-job="${job.id}"]`);
  const shown = [job.state, job.updated_at, job.queue_position, job.progress, job.attempt].join("|");
  if (row && row.dataset.shown === shown) return;
  if (!row) {
    row = newRow(job);
    tbody.prepend(row);
    dropOldRows(tbody);
  }
  row.dataset.state = job.state;
  row.dataset.shown = shown;
  // A running job changes about every 0.6 s: its cells are updated in place and its buttons kept, as long as
  // the row offers the same ones. A rebuilt row took the keyboard focus off Cancel, and lost clicks on it.
  const [, work, stateCell, position, progressCell, attempt, actions] = row.cells;
  work.textContent = workOf(job);
  work.title = workOf(job);
  stateCell.className = `state state-${job.state}`;
  stateCell.textContent = job.state + (job.error ? ` (${job.error.category})` : "");
  position.textContent = job.queue_position ? String(job.queue_position) : "–";
  progressCell.querySelector("progress").value = job.progress;
  attempt.textContent = `${job.run_attempt}/${job.max_attempts}`;
  const offered = actionsOf(job);
  if (actions.dataset.actions !== offered) {
    // A button that had the focus (Cancel of a job that just ended) hands it to its successor in the row.
    const focused = actions.contains(document.activeElement) ? document.activeElement.dataset.action : null;
    actions.dataset.actions = offered;
    actions.replaceChildren(...actionButtons(job));
    if (focused) (actions.querySelector(`[data-action="${focused}"]`) || actions.querySelector("button")).focus();
  }
  if (state.selectedJob === job.id) (TERMINAL.has(job.state) ? showResult : showPending)(job);
}

// The chosen job has not ended: the panel says so rather than keep an earlier job's result on screen.
function showPending(job) {
  state.resultCall += 1;
  $("#result").hidden = true;
  const empty = $("#result-empty");
  empty.hidden = false;
  const place = job.queue_position ? `, number ${job.queue_position} in the queue` : "";
  empty.textContent = `Job ${job.id.slice(0, 8)} is ${job.state}${place}; its result appears here when it ends.`;
}

function selectResult(job) {
  state.selectedJob = job.id;
  showResult(job);
}

// The newest jobs are polled, so a busy mesh would add rows without end: the oldest finished ones go.
const MAX_ROWS = 50;

function dropOldRows(tbody) {
  const rows = [...tbody.rows];
  for (let i = rows.length - 1; i >= 0 && tbody.rows.length > MAX_ROWS; i -= 1) {
    const id = rows[i].dataset.job;
    const job = state.jobs.get(id);
    if (!job || !TERMINAL.has(job.state) || id === state.selectedJob) continue;
    rows[i].remove();
    state.jobs.delete(id);
  }
}

async function loadJobs() {
  try {
    const body = await api("/v1/jobs?page_size=20");
    const listed = new Set();
    for (const job of body.jobs.reverse()) {
      showJob(job);
      listed.add(job.id);
    }
    // Unfinished rows that newer jobs pushed off the first page, and that no stream follows.
    const stale = [...state.jobs.values()]
      .filter((job) => !TERMINAL.has(job.state) && !listed.has(job.id) && !state.streams.has(job.id))
      .slice(0, 10);
    await Promise.all(stale.map(async (job) => showJob(await api(`/v1/jobs/${job.id}`))));
    $("#queue-status").textContent = "";
  } catch (error) {
    // An empty table read as "no jobs" when the key was missing or wrong, or the gateway down.
    const hint = error.code === "UNAUTHENTICATED" ? " Enter an API key under Credentials." : "";
    const rows = $("#queue tbody").rows.length ? " The rows below may be out of date." : "";
    $("#queue-status").textContent = `Queue unavailable: ${error.message.replace(/\.$/, "")}.${hint}${rows}`;
  }
}

// ---- Results: the processed image and the strip verdict drawn on the photo ----
async function imageUrlOf(imageId) {
  const response = await fetch(`/v1/images/${imageId}/content`, { headers: authHeaders() });
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  return URL.createObjectURL(await response.blob());
}

function drawLines(canvas, image, reading) {
  canvas.width = image.naturalWidth;
  canvas.height = image.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0);
  if (!reading) return;
  const strip = reading.window;
  const angle = ((strip ? strip.angle_degrees : 0) * Math.PI) / 180;
  const half = (strip && strip.width ? strip.width : canvas.height * 0.8) / 2;
  const scale = Math.max(1, canvas.width / 400);
  for (const [name, line, colour] of [["C", reading.control_line, "#1f7a3f"], ["T", reading.test_line, "#b3261e"]]) {
    if (!line || !line.present) continue;
    // Lines run across the strip: perpendicular to its axis, through the line's centre.
    const dx = Math.sin(angle) * half;
    const dy = Math.cos(angle) * half;
    context.strokeStyle = colour;
    context.lineWidth = 2 * scale;
    context.beginPath();
    context.moveTo(line.center_x - dx, line.center_y - dy);
    context.lineTo(line.center_x + dx, line.center_y + dy);
    context.stroke();
    context.fillStyle = colour;
    context.font = `bold ${14 * scale}px system-ui, sans-serif`;
    context.fillText(name, line.center_x + 4 * scale, Math.max(14 * scale, line.center_y - dy - 4 * scale));
  }
}

// What each quality flag means for the person holding the camera.
const QUALITY_ADVICE = {
  STRIP_NOT_FOUND: "no test strip found: photograph the strip or cassette so that it fills most of the picture",
  BLUR: "blurred: hold still and let the camera focus",
  UNDEREXPOSED: "too dark: add light",
  OVEREXPOSED: "too bright: avoid glare and direct light",
  NO_CONTROL_LINE: "no control line: the test did not run, so it cannot be read",
  UNEVEN_LIGHTING: "uneven light: avoid shadows across the read window",
};

function qualityText(flags) {
  return flags.length ? flags.map((flag) => QUALITY_ADVICE[flag] || flag).join("; ") : "no problems found";
}

// A retried job's attempts go on counting across its runs; each run has max_attempts of its own.
function attemptOf(job) {
  const run = `${job.run_attempt} of ${job.max_attempts}`;
  return job.attempt === job.run_attempt ? run : `${run} (attempt ${job.attempt} overall)`;
}

function showFailure(job) {
  const verdict = $("#verdict");
  verdict.className = `verdict state-${job.state}`;
  verdict.textContent = `Job ${job.id.slice(0, 8)} ${job.state}`;
  const facts = [["Work", workOf(job)], ["Attempt", attemptOf(job)]];
  if (job.error) facts.unshift(["Why", `${job.error.message} (${job.error.category})`]);
  $("#reading").replaceChildren(...facts.flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value)]));
  $("#result-images").hidden = true;
}

// A URL made here for a fetched image, given back once drawn or replaced (each held the image until the tab
// closed); the uploaded photo's own URL stays, as its preview shows it.
function release(url) {
  if (url && url !== state.imageUrl) URL.revokeObjectURL(url);
}

async function showResult(job) {
  // Each call supersedes the earlier ones: a slow fetch for the job shown before must not draw its photo and
  // lines under this job's verdict.
  const call = ++state.resultCall;
  const current = () => call === state.resultCall;
  $("#result-empty").hidden = true;
  $("#result").hidden = false;
  if (job.state !== "SUCCEEDED") {
    showFailure(job);
    return;
  }
  $("#result-images").hidden = false;
  const prediction = job.result ? job.result.prediction : null;
  const reading = prediction ? prediction.strip_reading : null;
  const verdict = $("#verdict");
  verdict.className = `verdict ${reading ? reading.verdict : ""}`;
  verdict.textContent = reading ? `Verdict: ${reading.verdict}` : `Job ${job.id.slice(0, 8)} succeeded (no model)`;
  const work = prediction && prediction.model_version ? `${workOf(job)} (version ${prediction.model_version})` : workOf(job);
  const facts = [["Work", work], ...(reading ? [
    ["T/C ratio", reading.t_to_c_ratio.toFixed(2)],
    ["Confidence", `${Math.round(reading.confidence * 100)} %`],
    ["Control line", reading.control_line.present ? `at ${reading.control_line.position.toFixed(2)}, intensity ${reading.control_line.intensity.toFixed(2)}` : "absent"],
    ["Test line", reading.test_line.present ? `at ${reading.test_line.position.toFixed(2)}, intensity ${reading.test_line.intensity.toFixed(2)}` : "absent"],
    ["Quality", qualityText(reading.quality_flags)],
  ] : [])];
  $("#reading").replaceChildren(...facts.flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value)]));
  // The model read the filters' output when there were filters, and its line positions are in that image's
  // pixels (a resize, crop or rotation moves them), so the lines are drawn on it; the photo shows beside it.
  const output = job.result && job.result.output_image_id !== job.image_id ? job.result.output_image_id : "";
  const original = async () =>
    job.image_id === state.imageId && state.imageUrl ? state.imageUrl : await imageUrlOf(job.image_id);
  const found = reading ? [["C", reading.control_line], ["T", reading.test_line]].filter(([, l]) => l.present) : [];
  const names = found.map(([name]) => name).join(" and ");
  const lines = found.length ? ` with the detected ${names} line${found.length > 1 ? "s" : ""}` : reading ? " (no line found)" : "";
  const kind = output ? "Filtered image" : "Photo";
  $("#canvas-caption").textContent = `${kind}${lines}`;
  // Blank until this job's picture is drawn: the one before was another job's.
  const canvas = $("#strip-canvas");
  canvas.width = 0;
  canvas.height = 0;
  canvas.dataset.lines = "0";
  const photo = $("#original-image");
  release(state.originalUrl);
  state.originalUrl = null;
  photo.removeAttribute("src");
  $("#original-figure").hidden = !output;
  $("#original-caption").textContent = "Photo before the filters";
  let url = null;
  try {
    url = output ? await imageUrlOf(output) : await original();
    const picture = new Image();
    picture.alt = "";
    picture.src = url;
    await picture.decode();
    if (current()) {
      drawLines(canvas, picture, reading);
      canvas.dataset.lines = String(found.length);
    }
  } catch (error) {
    if (current()) $("#canvas-caption").textContent = `${kind} unavailable (${error.message})`;
  } finally {
    release(url);
  }
  if (!output || !current()) return;
  try {
    const photoUrl = await original();
    if (!current()) { release(photoUrl); return; }
    state.originalUrl = photoUrl === state.imageUrl ? null : photoUrl;
    photo.src = photoUrl;
  } catch (error) {
    if (current()) $("#original-caption").textContent = `Photo before the filters: unavailable (${error.message})`;
  }
}

// ---- Health panel ----
async function loadHealth() {
  const badge = $("#health-status");
  try {
    const response = await fetch("/v1/health");
    const body = await response.json();
    badge.textContent = body.status;
    // Red when the mesh is not ready ("failing"), amber while it serves with something degraded or down.
    badge.className = `badge status-${body.status}`;
    $("#health tbody").replaceChildren(...body.components.map((c) => el("tr", { "data-component": c.name },
      el("td", {}, c.name), el("td", {}, c.source),
      el("td", { class: `status-${c.status}` }, c.status),
      el("td", {}, c.latency_ms === null ? "–" : `${c.latency_ms.toFixed(1)} ms`),
      el("td", {}, c.detail))));
    const queue = body.queue;
    $("#queue-depth").textContent = queue
      ? `Jobs by state: ${Object.entries(queue.jobs_by_state).map(([k, v]) => `${k} ${v}`).join(", ") || "none"}; dead letters ${queue.dead_letters}`
      : "Queue statistics unavailable.";
    state.healthAt = new Date();
    $("#health-checked").textContent = `Checked at ${time(state.healthAt)}.`;
  } catch (error) {
    // The rows and the badge's colour were the last answer's: every component green over a dead gateway.
    badge.textContent = "unreachable";
    badge.className = "badge status-failing";
    $("#health tbody").replaceChildren();
    $("#queue-depth").textContent = "Queue statistics unavailable.";
    const last = state.healthAt ? ` Last answer at ${time(state.healthAt)}.` : "";
    $("#health-checked").textContent = `The gateway did not answer at ${time(new Date())}.${last}`;
  }
}

function setupCredentials() {
  const input = $("#api-key");
  input.value = apiKey();
  input.addEventListener("change", () => {
    localStorage.setItem("mesh.apiKey", input.value.trim());
    loadFilters();
    loadModels();
    loadJobs();
  });
  // Enter in the field fires "change" above; the form itself must not submit and reload the page.
  $("#credentials-form").addEventListener("submit", (event) => event.preventDefault());
}

document.addEventListener("DOMContentLoaded", () => {
  setupCredentials();
  setupUpload();
  $("#job-form").addEventListener("submit", submitJob);
  loadFilters();
  loadModels();
  loadJobs();
  setInterval(loadJobs, QUEUE_POLL_MS);
  loadHealth();
  setInterval(loadHealth, 5000);
});
