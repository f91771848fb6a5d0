// KlipNote's page: upload or record audio, follow its transcription, review and edit the cues,
// download subtitles. Long recordings (hours) are the norm: the file is never read into memory
// (an object URL plays it, FormData sends it) and the event stream is parsed as it arrives.

// Relative to the page's <base>, which the service sets to its route prefix.
const API = {
  models: "v1/models",
  jobs: "v1/audio/transcriptions/jobs",
  transcriptions: "v1/audio/transcriptions",
};
const API_KEY_STORAGE = "klipnote.apiKey";
// The latest job, so that a reload picks its transcription up again; its cue edits beside it.
const JOB_STORAGE = "klipnote.job";
const EDITS_STORAGE_PREFIX = "klipnote.edits.";
const EDITS_SAVE_DELAY_MS = 300;
const IDLE_STATUS = "Choose or record a file to start.";
const RECONNECT_DELAY_MS = 2000;
const MAX_RECONNECTS = 5;
// media.currentTime may read back a hair below the cue start it was just set to.
const SEEK_EPSILON = 0.005;

const LANGUAGES = [
  ["zh", "Chinese (Mandarin)"],
  ["en", "English"],
  ["ja", "Japanese"],
  ["ko", "Korean"],
  ["de", "German"],
  ["fr", "French"],
  ["es", "Spanish"],
  ["it", "Italian"],
  ["pt", "Portuguese"],
  ["ru", "Russian"],
  ["ar", "Arabic"],
  ["hi", "Hindi"],
  ["yue", "Cantonese"],
  ["vi", "Vietnamese"],
  ["th", "Thai"],
  ["id", "Indonesian"],
  ["nl", "Dutch"],
  ["tr", "Turkish"],
  ["pl", "Polish"],
  ["uk", "Ukrainian"],
];
const LANGUAGE_NAMES = new Map(LANGUAGES);

const MODEL_LABELS = {
  auto: "Auto (route by language)",
  belle2: "BELLE-2 (Mandarin)",
  whisperx: "WhisperX",
};

const RECORDER_TYPES = ["audio/webm;codecs=opus", "audio/webm", "audio/ogg;codecs=opus", "audio/mp4"];

const DOWNLOADS = {
  srt: { build: buildSrt, type: "application/x-subrip;charset=utf-8" },
  vtt: { build: buildVtt, type: "text/vtt;charset=utf-8" },
  txt: { build: buildTxt, type: "text/plain;charset=utf-8" },
  json: { build: (cues) => buildJson(resultSoFar(), cues), type: "application/json;charset=utf-8" },
};

// ---------------------------------------------------------------------------------------------
// Pure helpers: formatting, subtitle files, the event-stream parser.

function pad(number, width) {
  return String(number).padStart(width, "0");
}

/** 75 -> "1:15", 3720 -> "1:02:00". */
function formatClock(seconds) {
  const total = Math.max(0, Math.floor(seconds || 0));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  return h ? `${h}:${pad(m, 2)}:${pad(s, 2)}` : `${m}:${pad(s, 2)}`;
}

/** 1.234 -> "0:01.2" (truncated to tenths, so a cue never shows a later time than it starts). */
function formatCueTime(seconds) {
  const tenths = Math.floor(Math.round(Math.max(0, seconds) * 1000) / 100);
  return `${formatClock(Math.floor(tenths / 10))}.${tenths % 10}`;
}

/** 1.234 -> "00:00:01,234" (SRT, mark ",") or "00:00:01.234" (VTT, mark "."). */
function formatTimestamp(seconds, mark) {
  let ms = Math.max(0, Math.round(seconds * 1000));
  const h = Math.floor(ms / 3_600_000);
  ms %= 3_600_000;
  const m = Math.floor(ms / 60_000);
  ms %= 60_000;
  const s = Math.floor(ms / 1000);
  ms %= 1000;
  return `${pad(h, 2)}:${pad(m, 2)}:${pad(s, 2)}${mark}${pad(ms, 3)}`;
}

function formatBytes(bytes) {
  if (bytes < 1024 * 1024) return `${Math.max(1, Math.round(bytes / 1024))} KB`;
  if (bytes < 1024 ** 3) return `${(bytes / 1024 ** 2).toFixed(1)} MB`;
  return `${(bytes / 1024 ** 3).toFixed(2)} GB`;
}

/** "talk.final.mp4" -> "talk.final"; what downloads are named after. */
function baseName(filename) {
  const name = (filename || "").replace(/^.*[\\/]/, "");
  const dot = name.lastIndexOf(".");
  return (dot > 0 ? name.slice(0, dot) : name) || "transcript";
}

// A cue whose text was deleted is left out of every download.
function keptCues(cues) {
  return cues.filter((cue) => cue.text.trim() !== "");
}

// A blank line ends a cue in SRT and VTT, so a cue's own lines must not contain one.
function subtitleLines(text) {
  return text.trim().replace(/\n\s*\n+/g, "\n");
}

function escapeVtt(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

function buildSrt(cues) {
  return keptCues(cues)
    .map((cue, i) => `${i + 1}\n${formatTimestamp(cue.start, ",")} --> ${formatTimestamp(cue.end, ",")}\n${subtitleLines(cue.text)}\n\n`)
    .join("");
}

function buildVtt(cues) {
  const blocks = keptCues(cues).map(
    (cue) => `${formatTimestamp(cue.start, ".")} --> ${formatTimestamp(cue.end, ".")}\n${escapeVtt(subtitleLines(cue.text))}\n\n`,
  );
  return `WEBVTT\n\n${blocks.join("")}`;
}

function buildTxt(cues) {
  return keptCues(cues)
    .map((cue) => `${cue.text.trim().replace(/\s*\n\s*/g, " ")}\n`)
    .join("");
}

// Chinese and Japanese are written without spaces; Korean (Hangul) is written with them.
const CJK = "\\p{Script=Han}\\p{Script=Hiragana}\\p{Script=Katakana}\\u3000-\\u303f\\uff00-\\uffef";
const ENDS_CJK = new RegExp(`[${CJK}]$`, "u");
const STARTS_CJK = new RegExp(`^[${CJK}]`, "u");

/** The cues' texts as one text: a space between two cues, none between two CJK neighbours. */
function joinCueTexts(cues) {
  let text = "";
  for (const cue of keptCues(cues)) {
    const part = cue.text.trim();
    if (text) text += ENDS_CJK.test(text) && STARTS_CJK.test(part) ? "" : " ";
    text += part;
  }
  return text;
}

/** The result as verbose JSON, its text and segments from the (possibly edited) cues. */
function buildJson(result, cues) {
  const out = {
    language: result.language ?? null,
    duration: result.duration ?? null,
    model: result.model ?? null,
    warnings: result.warnings ?? [],
    language_probability: result.language_probability ?? null,
  };
  if (result.languages) out.languages = result.languages;
  out.text = joinCueTexts(cues);
  out.segments = keptCues(cues).map((cue, i) => ({
    id: i,
    start: cue.start,
    end: cue.end,
    text: cue.text.trim(),
    language: cue.language ?? null,
    edited: cue.edited,
    // Word times describe the text as transcribed; after an edit they no longer match it.
    ...(cue.words && !cue.edited ? { words: cue.words } : {}),
  }));
  return `${JSON.stringify(out, null, 2)}\n`;
}

/**
 * A server-sent-events parser fed text chunks as they arrive: calls onData with each event's
 * data (its `data:` lines joined). Keeps only the unfinished line and event, never the stream.
 */
function createSseParser(onData) {
  let buffer = "";
  let dataLines = [];

  function takeLine(line) {
    if (line === "") {
      if (dataLines.length) {
        const data = dataLines.join("\n");
        dataLines = [];
        onData(data);
      }
      return;
    }
    if (line.startsWith(":")) return; // a keep-alive comment
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") dataLines.push(value);
  }

  return {
    push(chunk) {
      buffer += chunk;
      const newline = /\r\n|\r|\n/g;
      let start = 0;
      let match;
      while ((match = newline.exec(buffer))) {
        // A trailing "\r" may be the first half of a "\r\n" split across two chunks.
        if (match[0] === "\r" && newline.lastIndex === buffer.length) break;
        takeLine(buffer.slice(start, match.index));
        start = newline.lastIndex;
      }
      buffer = buffer.slice(start);
    },
    end() {
      if (buffer.endsWith("\r")) takeLine(buffer.slice(0, -1));
      // An event the stream did not finish with a blank line is dropped, as EventSource does.
      buffer = "";
      dataLines = [];
    },
  };
}

/** The index of the cue playing at `time` (cues sorted by start), or -1 between cues. */
function cueIndexAt(cues, time) {
  let low = 0;
  let high = cues.length - 1;
  let found = -1;
  while (low <= high) {
    const mid = (low + high) >> 1;
    if (cues[mid].start <= time + SEEK_EPSILON) {
      found = mid;
      low = mid + 1;
    } else {
      high = mid - 1;
    }
  }
  return found !== -1 && time < cues[found].end ? found : -1;
}

// ---------------------------------------------------------------------------------------------
// Talking to the API.

class ApiError extends Error {
  constructor(message, { status, code, type, param } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.type = type;
    this.param = param;
  }
}

function apiErrorFrom(status, body) {
  const error = body && body.error;
  if (error && error.message) return new ApiError(error.message, { status, code: error.code, type: error.type, param: error.param });
  if (body && typeof body.detail === "string") return new ApiError(body.detail, { status });
  return new ApiError(`The service answered with HTTP ${status}.`, { status });
}

function unreachable(reason) {
  return new ApiError(`Could not reach the service: ${reason}`);
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

async function readApiError(response) {
  return apiErrorFrom(response.status, parseJson(await response.text()));
}

function isAbort(error) {
  return error && error.name === "AbortError";
}

// Network failures and server-side trouble may pass; a refusal (4xx) will not.
function isRetryable(error) {
  return !isAbort(error) && (error.status === undefined || error.status >= 500);
}

function loadApiKey() {
  try {
    return localStorage.getItem(API_KEY_STORAGE) || "";
  } catch {
    return ""; // storage blocked: the key lasts as long as the page
  }
}

function saveApiKey(key) {
  try {
    if (key) localStorage.setItem(API_KEY_STORAGE, key);
    else localStorage.removeItem(API_KEY_STORAGE);
  } catch {
    // storage blocked: the key still works for this page
  }
}

function readStored(key) {
  try {
    return parseJson(localStorage.getItem(key));
  } catch {
    return null; // storage blocked
  }
}

// Full or blocked storage only costs what a reload would have kept: nothing to tell the user.
function writeStored(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch {
    // quota or blocked
  }
}

function removeStored(key) {
  try {
    localStorage.removeItem(key);
  } catch {
    // blocked
  }
}

function storedKeys() {
  try {
    return Array.from({ length: localStorage.length }, (_, i) => localStorage.key(i));
  } catch {
    return [];
  }
}

function editsKey(jobId) {
  return EDITS_STORAGE_PREFIX + jobId;
}

/** The remembered job ({id, filename, size, lastModified, type} of its file), or null. */
function recallJob() {
  const job = readStored(JOB_STORAGE);
  return job && typeof job.id === "string" && job.id ? job : null;
}

/** The remembered edits of a job's cues: {"<cue index>": "text"}. */
function recallEdits(jobId) {
  const edits = readStored(editsKey(jobId));
  return edits && typeof edits === "object" && !Array.isArray(edits) ? edits : {};
}

function authHeaders() {
  return app.apiKey ? { Authorization: `Bearer ${app.apiKey}` } : {};
}

async function apiFetch(url, options = {}) {
  try {
    return await fetch(url, { ...options, headers: { ...authHeaders(), ...options.headers } });
  } catch (error) {
    if (isAbort(error)) throw error;
    throw unreachable(error.message);
  }
}

/** POSTs a form with XMLHttpRequest, the one way to see upload progress. */
function postWithProgress(run, url, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    run.xhr = xhr;
    xhr.open("POST", url);
    xhr.setRequestHeader("Accept", "application/json");
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.onprogress = (event) => onProgress(event.loaded, event.lengthComputable ? event.total : 0);
    xhr.onload = () => resolve({ status: xhr.status, body: parseJson(xhr.responseText) });
    xhr.onerror = () => reject(unreachable("the upload did not get through."));
    xhr.onabort = () => reject(new DOMException("The upload was cancelled.", "AbortError"));
    xhr.onloadend = () => {
      run.xhr = null;
    };
    xhr.send(form);
  });
}

/** Reads a server-sent-events response as it arrives, calling onEvent with each parsed event. */
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const parser = createSseParser((data) => {
    const event = parseJson(data);
    if (event && typeof event === "object") onEvent(event);
  });
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    parser.push(decoder.decode(value, { stream: true }));
  }
  parser.push(decoder.decode());
  parser.end();
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// ---------------------------------------------------------------------------------------------
// Page state.

const app = {
  apiKey: "",
  file: null,
  mediaUrl: null,
  cues: [],
  cueById: new Map(),
  currentIndex: -1,
  result: {}, // what the service said of the whole transcription so far (model, warnings, language...)
  run: null, // the transcription in flight: { controller, xhr, jobUrl, over, cancelling }
  jobsDisabled: false, // the service answered jobs_disabled once: stream instead from then on
  recorder: null,
  job: null, // the remembered job whose cues the page shows: { id, filename, size, lastModified, type }
  edits: {}, // that job's edited cue texts by cue index, as remembered
  editsTimer: 0,
  resumed: false, // the cues are a job's picked up after a reload: a chosen file only joins them in the player
};

const ui = {};

function $(id) {
  return document.getElementById(id);
}

function state() {
  return document.body.dataset.state;
}

function isBusy() {
  return state() === "uploading" || state() === "running";
}

function setState(next) {
  document.body.dataset.state = next;
  updateControls();
}

function updateControls() {
  const busy = isBusy();
  const recording = Boolean(app.recorder);
  ui.fields.disabled = busy;
  ui.fileInput.disabled = recording;
  ui.submit.disabled = busy || recording || !app.file;
  ui.cancel.disabled = !busy || Boolean(app.run && app.run.cancelling);
  ui.dropZone.classList.toggle("disabled", busy || recording);
  for (const button of ui.downloads) button.disabled = app.cues.length === 0;
}

function setStatus(text) {
  if (ui.status.textContent !== text) ui.status.textContent = text;
}

function showError(error, source = "run") {
  ui.error.textContent = error.message;
  // The code is drawn by CSS from data-code, so the element's text stays the message alone.
  ui.error.dataset.code = error.code || "";
  ui.error.dataset.source = source;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.textContent = "";
  ui.error.dataset.code = "";
  ui.error.hidden = true;
}

function showModel(model) {
  if (!model) return;
  app.result.model = model;
  ui.modelUsed.textContent = model;
  ui.modelLine.hidden = false;
}

function showWarnings(warnings) {
  app.result.warnings = [...warnings];
  const unique = [...new Set(warnings)];
  const shown = [...ui.warnings.children].map((li) => li.textContent);
  if (shown.join("\n") === unique.join("\n")) return;
  ui.warnings.replaceChildren(
    ...unique.map((warning) => {
      const li = document.createElement("li");
      li.textContent = warning;
      return li;
    }),
  );
}

function showUploadProgress(loaded, total) {
  if (total > 0) {
    ui.progress.max = total;
    ui.progress.value = loaded;
    const percent = Math.floor((loaded / total) * 100);
    ui.progressText.textContent = `Uploading ${percent}% (${formatBytes(loaded)} of ${formatBytes(total)})`;
    if (loaded >= total) setStatus("Uploaded; handing it to the service…");
  } else {
    ui.progress.removeAttribute("value");
    ui.progressText.textContent = "Uploading…";
  }
}

function showTranscriptionProgress(done, total) {
  if (total > 0) {
    ui.progress.max = total;
    ui.progress.value = Math.min(done || 0, total);
    ui.progressText.textContent = `${formatClock(done)} of ${formatClock(total)}`;
  } else {
    ui.progress.removeAttribute("value");
    ui.progressText.textContent = `${formatClock(done)} transcribed`;
  }
}

/** The result fields known so far, for the JSON download before or after the transcription ends. */
function resultSoFar() {
  return { ...app.result, duration: app.result.duration ?? app.result.total_seconds ?? null };
}

function resetTranscript() {
  app.cues = [];
  app.cueById.clear();
  app.currentIndex = -1;
  app.result = {};
  ui.cues.replaceChildren();
  ui.cueCount.textContent = "";
  ui.warnings.replaceChildren();
  ui.modelUsed.textContent = "";
  ui.modelLine.hidden = true;
  ui.progress.max = 1;
  ui.progress.value = 0;
  ui.progressText.textContent = "";
  clearError();
  updateControls();
}

// ---------------------------------------------------------------------------------------------
// Remembering the job across reloads, with the user's edits of its cues.

function rememberJob(job, file) {
  forgetJob();
  app.job = { id: job.id, filename: file.name, size: file.size, lastModified: file.lastModified, type: file.type };
  writeStored(JOB_STORAGE, app.job);
}

/** Forgets the remembered job and every job's edits (only one job is ever remembered). */
function forgetJob() {
  clearTimeout(app.editsTimer);
  app.editsTimer = 0;
  app.job = null;
  app.edits = {};
  app.resumed = false;
  removeStored(JOB_STORAGE);
  for (const key of storedKeys()) {
    if (key && key.startsWith(EDITS_STORAGE_PREFIX)) removeStored(key);
  }
  ui.resumed.hidden = true;
}

function rememberEdit(index, text) {
  if (!app.job) return; // a streamed transcription: nothing to pick up after a reload
  app.edits[index] = text;
  clearTimeout(app.editsTimer);
  app.editsTimer = setTimeout(saveEdits, EDITS_SAVE_DELAY_MS);
}

/** Writes the edits now if a write is due (on blur, or as the page goes away). */
function saveEdits() {
  if (!app.editsTimer) return;
  clearTimeout(app.editsTimer);
  app.editsTimer = 0;
  if (app.job) writeStored(editsKey(app.job.id), app.edits);
}

function isSameFile(file, job) {
  return file.name === job.filename && file.size === job.size;
}

function showResumed(failed) {
  const job = app.job;
  const name = job.filename || "a file";
  let text;
  if (failed) text = `Could not pick up your transcription of ${name} from before the page was reloaded. Reload the page to try again.`;
  else {
    text = `Picked up your transcription of ${name} from before the page was reloaded.`;
    if (!app.file) text += " Choose the same file again to play it alongside the cues.";
    else if (!isSameFile(app.file, job)) text += ` This is not the file that was transcribed (${name}); cue times may not match.`;
  }
  ui.resumedText.textContent = text;
  ui.resumedChoose.hidden = failed; // no cues to play the file alongside
  ui.resumed.hidden = false;
}

function idleStatus() {
  return app.file ? `Ready to transcribe ${app.file.name}.` : IDLE_STATUS;
}

/** Drops the picked-up transcription from the page and from memory; the job itself stays on the server. */
function startOver() {
  if (app.run && !app.run.over) endRun(app.run);
  forgetJob();
  resetTranscript();
  setState("idle");
  setStatus(idleStatus());
}

function isGone(error) {
  return error.status === 404 && error.code === "job_not_found";
}

// ---------------------------------------------------------------------------------------------
// Models and settings.

function modelLabel(model) {
  const label = MODEL_LABELS[model.id] || model.id;
  return model.available === false ? `${label} (unavailable)` : label;
}

function fillModels(models) {
  const chosen = ui.model.value;
  const entries = models.some((model) => model.id === "auto") ? models : [{ id: "auto" }, ...models];
  const ordered = [...entries.filter((m) => m.id === "auto"), ...entries.filter((m) => m.id !== "auto")];
  ui.model.replaceChildren(...ordered.map((model) => new Option(modelLabel(model), model.id)));
  if (ordered.some((model) => model.id === chosen)) ui.model.value = chosen;
}

async function loadModels() {
  try {
    const response = await apiFetch(API.models, { headers: { Accept: "application/json" } });
    if (!response.ok) throw await readApiError(response);
    const body = await response.json();
    fillModels(Array.isArray(body.data) ? body.data : []);
    if (ui.error.dataset.source === "settings") clearError();
  } catch (error) {
    showError(error, "settings");
    if (error.status === 401) ui.settings.open = true;
  }
}

function fillLanguages() {
  const options = [new Option("Auto-detect", ""), ...LANGUAGES.map(([code, name]) => new Option(`${name} (${code})`, code))];
  ui.language.replaceChildren(...options);
}

function onApiKeyChange(event) {
  event.preventDefault(); // Enter in the key field submits the settings form: no page reload
  app.apiKey = ui.apiKey.value.trim();
  saveApiKey(app.apiKey);
  loadModels();
}

// ---------------------------------------------------------------------------------------------
// Choosing, dropping and recording a file; the player.

function chooseFile(file) {
  if (!file || app.recorder) return;
  // A transcription picked up after a reload stays, running or not: the file joins its cues in the player.
  if (app.resumed) {
    useFile(file);
    showResumed(false);
    updateControls();
    return;
  }
  if (isBusy()) return;
  useFile(file);
  resetTranscript();
  setState("idle");
  setStatus(`Ready to transcribe ${file.name}.`);
}

function useFile(file) {
  app.file = file;
  ui.fileInfo.textContent = `${file.name} · ${formatBytes(file.size)}`;
  loadMedia(file);
}

function mediaKind(file) {
  return file.type.startsWith("video/") ? "video" : "audio";
}

function loadMedia(file) {
  if (app.mediaUrl) URL.revokeObjectURL(app.mediaUrl);
  app.mediaUrl = URL.createObjectURL(file);
  const kind = mediaKind(file);
  let media = $("media");
  if (media) media.pause();
  if (!media || media.localName !== kind) {
    media = createMedia(kind);
    ui.player.replaceChildren(media);
  }
  media.setAttribute("aria-label", `Player: ${file.name}`);
  ui.playerNote.hidden = true;
  media.src = app.mediaUrl;
}

function createMedia(kind) {
  const media = document.createElement(kind);
  media.id = "media";
  media.controls = true;
  media.preload = "metadata";
  if (kind === "video") media.playsInline = true;
  media.addEventListener("timeupdate", syncCurrentCue);
  media.addEventListener("seeked", syncCurrentCue);
  media.addEventListener("loadedmetadata", () => {
    ui.playerNote.hidden = true;
  });
  media.addEventListener("error", () => {
    ui.playerNote.textContent = "This browser cannot play this file.";
    ui.playerNote.hidden = false;
  });
  return media;
}

function onFileInputChange(event) {
  const input = event.target;
  const [file] = input.files;
  chooseFile(file);
  input.value = ""; // so that choosing the same file again is a change too
}

function hasFiles(event) {
  return event.dataTransfer && [...event.dataTransfer.types].includes("Files");
}

function onDragOver(event) {
  if (!hasFiles(event)) return;
  event.preventDefault();
  const usable = !isBusy() && !app.recorder;
  event.dataTransfer.dropEffect = usable ? "copy" : "none";
  ui.dropZone.classList.toggle("dragging", usable);
}

function onDragLeave(event) {
  if (!ui.dropZone.contains(event.relatedTarget)) ui.dropZone.classList.remove("dragging");
}

function onDrop(event) {
  if (!hasFiles(event)) return;
  event.preventDefault();
  ui.dropZone.classList.remove("dragging");
  chooseFile(event.dataTransfer.files[0]);
}

// A file dropped next to the zone would otherwise replace the page with the file.
function ignoreStrayDrop(event) {
  if (hasFiles(event) && !ui.dropZone.contains(event.target)) event.preventDefault();
}

function recorderType() {
  if (!window.MediaRecorder || !MediaRecorder.isTypeSupported) return "";
  return RECORDER_TYPES.find((type) => MediaRecorder.isTypeSupported(type)) || "";
}

function recordingExtension(mimeType) {
  if (mimeType.startsWith("audio/ogg")) return "ogg";
  if (mimeType.startsWith("audio/mp4") || mimeType.startsWith("video/mp4")) return "mp4";
  return "webm";
}

async function toggleRecording() {
  if (app.recorder) {
    app.recorder.stop();
    return;
  }
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    showError(new Error("Recording needs a browser with microphone access on a secure page (HTTPS or localhost)."));
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (error) {
    showError(new Error(`Could not use the microphone: ${error.message}`));
    return;
  }
  startRecorder(stream);
}

function startRecorder(stream) {
  const mimeType = recorderType();
  const recorder = new MediaRecorder(stream, mimeType ? { mimeType } : undefined);
  const chunks = [];
  const startedAt = performance.now();
  const showElapsed = () => {
    ui.record.textContent = `Stop · ${formatClock((performance.now() - startedAt) / 1000)}`;
  };
  const timer = setInterval(showElapsed, 500);

  recorder.ondataavailable = (event) => {
    if (event.data.size) chunks.push(event.data);
  };
  recorder.onstop = () => {
    clearInterval(timer);
    for (const track of stream.getTracks()) track.stop();
    app.recorder = null;
    ui.record.textContent = "Record";
    ui.record.setAttribute("aria-pressed", "false");
    const type = (recorder.mimeType || mimeType || "audio/webm").split(";")[0];
    chooseFile(new File(chunks, `recording.${recordingExtension(type)}`, { type }));
  };

  recorder.start(1000);
  app.recorder = recorder;
  clearError();
  ui.record.setAttribute("aria-pressed", "true");
  showElapsed();
  setStatus("Recording from the microphone…");
  updateControls();
}

// ---------------------------------------------------------------------------------------------
// Transcribing: submit a job and follow its events, or stream when jobs are turned off.

function buildForm(stream) {
  const form = new FormData();
  form.append("file", app.file, app.file.name);
  form.append("model", ui.model.value || "auto");
  if (ui.language.value) form.append("language", ui.language.value);
  form.append("script", ui.script.value);
  form.append("response_format", "verbose_json");
  if (ui.wordTimestamps.checked) form.append("timestamp_granularities[]", "word");
  if (stream) form.append("stream", "true");
  return form;
}

function newRun() {
  return { controller: new AbortController(), xhr: null, jobUrl: null, over: false, cancelling: false };
}

async function startTranscription(event) {
  event.preventDefault();
  if (!app.file || isBusy() || app.recorder) return;
  if (app.run && !app.run.over) endRun(app.run); // a pick-up still asking for its job
  forgetJob();
  resetTranscript();
  const run = newRun();
  app.run = run;
  try {
    const job = app.jobsDisabled ? null : await submitJob(run);
    if (job) await followJob(run, job);
    else await streamTranscription(run);
  } catch (error) {
    if (!run.over) failRun(run, error);
  }
}

/** The job the service queued, or null when it has jobs turned off. */
async function submitJob(run) {
  setState("uploading");
  setStatus(`Uploading ${app.file.name}…`);
  const { status, body } = await postWithProgress(run, API.jobs, buildForm(false), showUploadProgress);
  if (status === 202 && body) {
    rememberJob(body, app.file);
    return body;
  }
  const error = apiErrorFrom(status, body);
  if (status === 404 && error.code === "jobs_disabled") {
    app.jobsDisabled = true;
    return null;
  }
  throw error;
}

function jobUrl(id) {
  return `${API.jobs}/${encodeURIComponent(id)}`;
}

async function followJob(run, job) {
  run.jobUrl = jobUrl(job.id);
  const eventsUrl = `${run.jobUrl}/events`;
  setState("running");
  showJob(job);
  let failures = 0;
  while (!run.over) {
    try {
      const response = await apiFetch(eventsUrl, { signal: run.controller.signal, headers: { Accept: "text/event-stream" } });
      if (!response.ok) throw await readApiError(response);
      await readEvents(response, (event) => {
        failures = 0;
        handleEvent(run, event);
      });
    } catch (error) {
      if (run.over) return;
      if (!isRetryable(error)) throw error;
    }
    if (run.over) return;
    failures += 1;
    if (failures > MAX_RECONNECTS) {
      throw new ApiError("Lost the connection to the service while following the transcription; the job may still finish on the server.");
    }
    setStatus(`Connection lost; reconnecting (${failures} of ${MAX_RECONNECTS})…`);
    await sleep(RECONNECT_DELAY_MS);
  }
}

/** On page load: follows the remembered job again, as if just submitted, if the service still has it. */
async function resumeJob() {
  const remembered = recallJob();
  if (!remembered) return;
  app.job = remembered;
  app.edits = recallEdits(remembered.id);
  const run = newRun();
  app.run = run;
  let job;
  try {
    job = await fetchJob(run, remembered.id);
  } catch (error) {
    if (run.over) return;
    if (isGone(error)) {
      endRun(run);
      forgetJob(); // finished and past its retention, or deleted: nothing left to show
      setStatus(idleStatus());
      return;
    }
    // Kept in memory: the service may be back by the next reload.
    failRun(run, error);
    setStatus("Could not pick up the transcription.");
    showResumed(true);
    return;
  }
  if (run.over) return; // a new transcription started meanwhile
  app.resumed = true;
  showResumed(false);
  try {
    await followJob(run, job);
  } catch (error) {
    if (run.over) return;
    if (isGone(error)) startOver();
    else failRun(run, error);
  }
}

/** The job as the service has it, asked again a few times while the service cannot be reached. */
async function fetchJob(run, id) {
  for (let failures = 0; ; failures += 1) {
    try {
      const response = await apiFetch(jobUrl(id), { signal: run.controller.signal, headers: { Accept: "application/json" } });
      if (!response.ok) throw await readApiError(response);
      return await response.json();
    } catch (error) {
      if (run.over || !isRetryable(error) || failures >= MAX_RECONNECTS) throw error;
    }
    setStatus(`Could not reach the service; trying again (${failures + 1} of ${MAX_RECONNECTS})…`);
    await sleep(RECONNECT_DELAY_MS);
  }
}

function showJob(job) {
  showModel(job.model);
  if (Array.isArray(job.warnings)) showWarnings(job.warnings);
  const progress = job.progress || {};
  showTranscriptionProgress(progress.done_seconds || 0, progress.total_seconds);
  const position = job.status === "queued" && job.queue_position ? ` (position ${job.queue_position} in the queue)` : "";
  setStatus(`${job.stage || "Queued"}${position}`);
}

async function streamTranscription(run) {
  setState("uploading");
  setStatus(`Uploading ${app.file.name}…`);
  showUploadProgress(0, 0);
  const response = await apiFetch(API.transcriptions, {
    method: "POST",
    body: buildForm(true),
    signal: run.controller.signal,
    headers: { Accept: "text/event-stream" },
  });
  if (!response.ok) throw await readApiError(response);
  setState("running");
  setStatus("Transcribing…");
  await readEvents(response, (event) => handleEvent(run, event));
  if (!run.over) throw new ApiError("The service closed the connection before the transcription finished.");
}

function handleEvent(run, event) {
  if (run !== app.run || run.over) return;
  switch (event.type) {
    case "transcript.text.segment":
      addCue(event);
      break;
    case "transcript.progress":
      showProgressEvent(run, event);
      break;
    case "transcript.text.done":
      finishRun(run, event);
      break;
    case "error":
      endWithError(run, event.error || {});
      break;
    default:
      // transcript.text.delta: the segments carry the same text, with times.
      break;
  }
}

function showProgressEvent(run, event) {
  showModel(event.model);
  if (Array.isArray(event.warnings)) showWarnings(event.warnings);
  if (event.total_seconds) app.result.total_seconds = event.total_seconds;
  showTranscriptionProgress(event.done_seconds, event.total_seconds);
  if (run.cancelling) return;
  const stage = event.stage || (event.model ? `Transcribing with ${event.model}` : "Transcribing…");
  setStatus(stage);
}

function endRun(run) {
  run.over = true;
  if (run.xhr) run.xhr.abort();
  run.controller.abort();
}

function finishRun(run, done) {
  endRun(run);
  const { type, text, segments, ...result } = done; // the text and segments are the cues'
  Object.assign(app.result, result);
  showModel(result.model);
  if (Array.isArray(result.warnings)) showWarnings(result.warnings);
  ui.progress.max = 1;
  ui.progress.value = 1;
  if (result.duration) ui.progressText.textContent = `${formatClock(result.duration)} of ${formatClock(result.duration)}`;
  setState("done");
  setStatus(doneSummary(result));
}

function languageName(code) {
  return LANGUAGE_NAMES.get(code) || code;
}

/** What language ID heard: each language's share of a mixed recording, or how sure it was of one. */
function heardLanguages(result) {
  const languages = Array.isArray(result.languages) ? result.languages.filter((l) => l && l.language) : [];
  if (languages.length > 1) {
    return languages.map((l) => `${languageName(l.language)} ${Math.round((l.share || 0) * 100)}%`).join(", ");
  }
  if (!result.language) return "";
  const sure = typeof result.language_probability === "number" ? `, language ID ${Math.round(result.language_probability * 100)}% sure` : "";
  return languageName(result.language) + sure;
}

function doneSummary(result) {
  const parts = [`Done: ${app.cues.length} ${app.cues.length === 1 ? "cue" : "cues"}`];
  const heard = heardLanguages(result);
  if (heard) parts.push(heard);
  if (result.duration) parts.push(formatClock(result.duration));
  return parts.join(" · ");
}

function endWithError(run, error) {
  if (error.code === "job_not_found") forgetJob(); // deleted while followed
  if (error.code === "job_cancelled") finishCancelled(run);
  else failRun(run, apiErrorFrom(undefined, { error }));
}

function finishCancelled(run) {
  endRun(run);
  clearError();
  setState("cancelled");
  setStatus("Cancelled");
}

function failRun(run, error) {
  endRun(run);
  showError(error);
  if (error.status === 401) ui.settings.open = true;
  setState("error");
  setStatus("The transcription failed.");
}

async function cancelRun() {
  const run = app.run;
  if (!run || run.over || run.cancelling) return;
  // Before the job exists, and for a streamed transcription, stopping the request is the cancel.
  if (!run.jobUrl) {
    finishCancelled(run);
    return;
  }
  run.cancelling = true;
  updateControls();
  setStatus("Cancelling…");
  try {
    const response = await apiFetch(run.jobUrl, { method: "DELETE", headers: { Accept: "application/json" } });
    if (!response.ok) throw await readApiError(response);
    const job = await response.json();
    if (job.deleted) forgetJob();
    // A running job stops at its runner's next check; its event stream then ends with job_cancelled.
    // Any other answer (cancelled while queued, or deleted because it had just finished) ends it here.
    if (job.status !== "running" && !run.over) finishCancelled(run);
  } catch (error) {
    if (run.over) return;
    run.cancelling = false;
    updateControls();
    showError(error);
  }
}

// ---------------------------------------------------------------------------------------------
// Cues: rendering, following the player, editing, keyboard.

const EDITABLE = supportsPlaintextEditing() ? "plaintext-only" : "true";

function supportsPlaintextEditing() {
  const probe = document.createElement("span");
  try {
    probe.contentEditable = "plaintext-only";
  } catch {
    return false;
  }
  return probe.contentEditable === "plaintext-only";
}

function addCue(segment) {
  const id = segment.id ?? `seg_${app.cues.length}`;
  if (app.cueById.has(id)) return; // a reconnected event stream starts over from the first segment
  const cue = {
    id,
    start: Number(segment.start),
    end: Number(segment.end),
    text: String(segment.text ?? "").trim(),
    language: segment.language ?? null,
    speaker: segment.speaker ?? null,
    words: segment.words,
    edited: false,
  };
  const index = app.cues.length;
  const edit = app.edits[index];
  if (typeof edit === "string") {
    cue.text = edit;
    cue.edited = true;
  }
  app.cueById.set(id, cue);
  app.cues.push(cue);
  ui.cues.append(renderCue(cue, index));
  ui.cueCount.textContent = `(${app.cues.length})`;
  if (app.cues.length === 1) updateControls();
}

function renderCue(cue, index) {
  const row = document.createElement("li");
  row.className = cue.edited ? "cue edited" : "cue";
  row.tabIndex = 0;
  row.dataset.index = String(index);
  row.dataset.start = String(cue.start);
  row.dataset.end = String(cue.end);

  const time = document.createElement("span");
  time.className = "cue-time";
  time.textContent = formatCueTime(cue.start);

  const text = document.createElement("span");
  text.className = "cue-text";
  text.contentEditable = EDITABLE;
  text.setAttribute("role", "textbox");
  text.setAttribute("aria-label", `Text of the cue at ${formatCueTime(cue.start)}`);
  text.textContent = cue.text;

  row.append(time, text);
  return row;
}

function rowAt(index) {
  return ui.cues.children[index] || null;
}

function media() {
  return $("media");
}

function isEditingCue() {
  const active = document.activeElement;
  return Boolean(active && active.classList && active.classList.contains("cue-text"));
}

function setCurrentCue(index, scroll) {
  if (index === app.currentIndex) return;
  const previous = rowAt(app.currentIndex);
  if (previous) {
    previous.classList.remove("current");
    previous.removeAttribute("aria-current");
  }
  app.currentIndex = index;
  const row = rowAt(index);
  if (!row) return;
  row.classList.add("current");
  row.setAttribute("aria-current", "true");
  if (scroll && !isEditingCue()) scrollIntoList(row);
}

/** Scrolls the cue list, and nothing around it, to show the row ("nearest", like scrollIntoView). */
function scrollIntoList(row) {
  const list = ui.cues;
  if (list.scrollHeight <= list.clientHeight) return;
  const margin = 8;
  const top = row.offsetTop - margin;
  const bottom = row.offsetTop + row.offsetHeight + margin;
  if (top < list.scrollTop) list.scrollTop = top;
  else if (bottom > list.scrollTop + list.clientHeight) list.scrollTop = bottom - list.clientHeight;
}

function syncCurrentCue() {
  const player = media();
  if (player) setCurrentCue(cueIndexAt(app.cues, player.currentTime), true);
}

function seekToCue(index, focusRow) {
  const cue = app.cues[index];
  if (!cue) return;
  const player = media();
  if (player) player.currentTime = cue.start;
  setCurrentCue(index, false);
  const row = rowAt(index);
  if (focusRow) row.focus({ preventScroll: true });
  if (!isEditingCue()) scrollIntoList(row);
}

function onCueClick(event) {
  const row = event.target.closest(".cue");
  if (row) seekToCue(Number(row.dataset.index), false);
}

function editCue(row) {
  const text = row.querySelector(".cue-text");
  text.focus();
  const range = document.createRange();
  range.selectNodeContents(text);
  range.collapse(false);
  const selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
}

function onCueKeydown(event) {
  const inText = event.target.classList.contains("cue-text");
  const row = event.target.closest(".cue");
  if (!row) return;
  if (!inText && event.key === "Enter") {
    event.preventDefault();
    editCue(row);
  } else if (inText && (event.key === "Escape" || (event.key === "Enter" && !event.shiftKey && !event.isComposing))) {
    // Enter ends the edit too: a cue is one line in TXT, and IME composition keeps its own Enter.
    event.preventDefault();
    row.focus({ preventScroll: true });
  }
}

function onCueInput(event) {
  if (!event.target.classList.contains("cue-text")) return;
  const row = event.target.closest(".cue");
  const cue = app.cues[Number(row.dataset.index)];
  cue.text = event.target.textContent;
  cue.edited = true;
  row.classList.add("edited");
  rememberEdit(row.dataset.index, cue.text);
}

function onCueFocusOut(event) {
  if (event.target.classList.contains("cue-text")) saveEdits();
}

function isTypingTarget(element) {
  return element.isContentEditable || element.matches("input, textarea, select");
}

function isNativeControl(element) {
  return element.matches("button, a[href], summary, audio, video, [role=button]");
}

function togglePlayback() {
  const player = media();
  if (!player || !player.src) return false;
  if (player.paused) player.play().catch(() => {}); // a refused play() leaves the page as it was
  else player.pause();
  return true;
}

/** Moves to the previous (-1) or next (+1) cue from the focused row, or else the one playing. */
function moveCue(step) {
  if (!app.cues.length) return false;
  const focused = document.activeElement && document.activeElement.closest && document.activeElement.closest(".cue");
  let from = focused ? Number(focused.dataset.index) : app.currentIndex;
  if (from === -1) {
    const player = media();
    from = player ? cueIndexAt(app.cues, player.currentTime) : -1;
  }
  const to = from === -1 ? 0 : Math.min(Math.max(from + step, 0), app.cues.length - 1);
  seekToCue(to, true);
  return true;
}

function onPageKeydown(event) {
  if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey) return;
  const target = event.target instanceof Element ? event.target : document.body;
  if (isTypingTarget(target)) return;
  if (event.key === " ") {
    if (isNativeControl(target)) return;
    if (togglePlayback()) event.preventDefault();
  } else if (event.key === "ArrowDown" || event.key === "ArrowUp") {
    if (target.matches("audio, video")) return;
    if (moveCue(event.key === "ArrowDown" ? 1 : -1)) event.preventDefault();
  }
}

// ---------------------------------------------------------------------------------------------
// Downloads.

function download(kind) {
  const { build, type } = DOWNLOADS[kind];
  const blob = new Blob([build(app.cues)], { type });
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = `${baseName((app.job && app.job.filename) || (app.file && app.file.name))}.${kind}`;
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// ---------------------------------------------------------------------------------------------

function init() {
  Object.assign(ui, {
    form: $("job-form"),
    fields: $("job-fields"),
    fileInput: $("file-input"),
    dropZone: $("drop-zone"),
    fileInfo: $("file-info"),
    record: $("record"),
    model: $("model"),
    language: $("language"),
    script: $("script"),
    wordTimestamps: $("word-timestamps"),
    submit: $("submit"),
    cancel: $("cancel"),
    settings: $("settings"),
    apiKey: $("api-key"),
    status: $("status"),
    progress: $("progress"),
    progressText: $("progress-text"),
    modelLine: $("model-line"),
    modelUsed: $("model-used"),
    warnings: $("warnings"),
    error: $("error"),
    player: $("player"),
    playerNote: $("player-note"),
    cues: $("cues"),
    cueCount: $("cue-count"),
    resumed: $("resumed"),
    resumedText: $("resumed-text"),
    resumedFile: $("resumed-file"),
    resumedChoose: $("resumed-choose"),
    resumedDismiss: $("resumed-dismiss"),
    downloads: Object.keys(DOWNLOADS).map((kind) => $(`download-${kind}`)),
  });

  app.apiKey = loadApiKey();
  ui.apiKey.value = app.apiKey;
  fillLanguages();

  ui.form.addEventListener("submit", startTranscription);
  ui.cancel.addEventListener("click", cancelRun);
  ui.fileInput.addEventListener("change", onFileInputChange);
  ui.dropZone.addEventListener("dragenter", onDragOver);
  ui.dropZone.addEventListener("dragover", onDragOver);
  ui.dropZone.addEventListener("dragleave", onDragLeave);
  ui.dropZone.addEventListener("drop", onDrop);
  window.addEventListener("dragover", ignoreStrayDrop);
  window.addEventListener("drop", ignoreStrayDrop);
  ui.record.addEventListener("click", toggleRecording);
  ui.apiKey.addEventListener("change", onApiKeyChange);
  $("settings-form").addEventListener("submit", onApiKeyChange);
  ui.cues.addEventListener("click", onCueClick);
  ui.cues.addEventListener("keydown", onCueKeydown);
  ui.cues.addEventListener("input", onCueInput);
  ui.cues.addEventListener("focusout", onCueFocusOut);
  ui.resumedFile.addEventListener("change", onFileInputChange);
  ui.resumedDismiss.addEventListener("click", startOver);
  // A reload within the save delay of the last keystroke keeps it too.
  window.addEventListener("pagehide", saveEdits);
  document.addEventListener("keydown", onPageKeydown);
  for (const button of ui.downloads) {
    button.addEventListener("click", () => download(button.id.replace("download-", "")));
  }

  updateControls();
  loadModels();
  resumeJob();
}

init();
