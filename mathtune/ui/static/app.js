// mathtune ui: the little JavaScript the pages need (live run view, memory estimate, chat, jobs).
// Plain browser APIs only: EventSource for server-sent events, fetch, and SVG drawn by hand.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf"]').content;
const $ = (id) => document.getElementById(id);
const fill = (template, values) => template.replace(/\{(\w+)\}/g, (_, k) => values[k]);

// ---- Run page: status, progress, loss chart and log, from /runs/NAME/events ----
function watchRun(name) {
  const train = [], evals = [], rewards = [], correct = [];
  const words = JSON.parse($("status").dataset.words);
  const progressWords = JSON.parse($("progress").dataset.words);
  const source = new EventSource(`/runs/${encodeURIComponent(name)}/events`);
  source.onmessage = (message) => {
    const e = JSON.parse(message.data);
    if (e.reset) { for (const points of [train, evals, rewards, correct]) points.length = 0; }
    for (const m of e.metrics) {
      if ("loss" in m) train.push([m.step, m.loss]);
      if ("eval_loss" in m) evals.push([m.step, m.eval_loss]);
      // A GRPO run: the mean reward of the step's answers and the share the verifier found correct.
      if (m.reward != null) rewards.push([m.step, m.reward]);
      if (m["rewards/correctness/mean"] != null) correct.push([m.step, m["rewards/correctness/mean"]]);
    }
    const status = $("status");
    status.textContent = words[e.status];
    status.className = `status ${e.status}`;
    $("stop-form").hidden = e.status !== "running";
    $("resume-form").hidden = !["interrupted", "failed", "incomplete"].includes(e.status);
    const p = e.progress;
    let text = `${progressWords.steps}: ${p.step}${p.max_steps ? " / " + p.max_steps : ""}`;
    if (p.tokens_per_second) text += ` · ${Math.round(p.tokens_per_second)} ${progressWords.tokens}`;
    if (p.seconds_left != null && e.status === "running") text += ` · ${progressWords.left} ${formatSeconds(p.seconds_left)}`;
    $("progress").textContent = text;
    $("bar").max = p.max_steps || Math.max(p.step, 1);
    $("bar").value = p.step;
    drawChart($("chart"), [[train, "train"], [evals, "eval"]]);
    $("reward-section").hidden = !rewards.length;
    if (rewards.length) drawChart($("reward-chart"), [[rewards, "train"], [correct, "eval"]]);
    const log = $("log");
    const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent = e.log;
    if (atEnd) log.scrollTop = log.scrollHeight;
  };
}

function formatSeconds(s) {
  return s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`
       : s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

// Lines of (step, value) points in an SVG with axes; data-points says how many points are drawn.
function drawChart(svg, series) {
  const W = 640, H = 260, left = 52, right = 12, top = 12, bottom = 28;
  const all = series.flatMap(([points]) => points);
  svg.dataset.points = all.length;
  if (!all.length) { svg.innerHTML = ""; return; }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const X = (x) => left + ((x - x0) / (x1 - x0)) * (W - left - right);
  const Y = (y) => top + (1 - (y - y0) / (y1 - y0)) * (H - top - bottom);
  let out = `<line class="axis" x1="${left}" y1="${H - bottom}" x2="${W - right}" y2="${H - bottom}"/>`
          + `<line class="axis" x1="${left}" y1="${top}" x2="${left}" y2="${H - bottom}"/>`;
  for (const v of [y0, (y0 + y1) / 2, y1]) out += `<text class="tick" x="${left - 6}" y="${Y(v) + 4}" text-anchor="end">${v.toFixed(3)}</text>`;
  for (const v of [x0, x1]) out += `<text class="tick" x="${X(v)}" y="${H - 8}" text-anchor="middle">${v}</text>`;
  series.forEach(([points, kind], i) => {
    if (!points.length) return;
    const path = points.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
    // Evaluations are a few points far apart (often before and after only): dots, not a line between them.
    if (kind === "train") out += `<polyline class="line ${kind}" points="${path}"/>`;
    out += points.map((p) => `<circle class="dot ${kind}" cx="${X(p[0]).toFixed(1)}" cy="${Y(p[1]).toFixed(1)}" r="2.5"/>`).join("");
    out += `<text class="legend ${kind}" x="${W - right - 4}" y="${top + 14 + 16 * i}" text-anchor="end">${svg.dataset[kind]}</text>`;
  });
  svg.innerHTML = out;
}

// ---- New run page: memory estimate and validation as the settings change ----
function watchSettings(form) {
  const words = $("words").dataset;
  let timer = null;
  const update = async () => {
    const response = await fetch("/api/estimate", { method: "POST", headers: { "X-CSRF-Token": csrf() }, body: new FormData(form) });
    const r = await response.json();
    for (const field of form.querySelectorAll(".field[data-key]")) {
      const problems = r.problems[field.dataset.key] || [];
      field.classList.toggle("has-problem", problems.length > 0);
      field.querySelector(".problem").textContent = problems.join(" ");
    }
    const box = $("estimate");
    const e = r.estimate;
    if (!e) { box.textContent = r.other.join(" "); box.className = "estimate"; return; }
    if (e.error) { box.textContent = e.error; box.className = "estimate"; return; }
    const values = { total: e.total_gib, room: e.capacity_gib ?? "?" };
    box.textContent = `${fill(e.fits ? words.fits : words.nofit, values)} (${e.where})`
      + (e.fix ? ` · ${words.fitswith}: ${e.fix.join(" ")}` : "");
    box.className = `estimate ${e.fits ? "ok" : "bad"}`;
  };
  form.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(update, 300); });
  update();
}

// ---- Chat page: the same question to the fine-tuned and the base model, streamed ----
function chatForm(name) {
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const q = $("question").value.trim();
    if (!q) return;
    $("answer-tuned").textContent = "";
    $("answer-base").textContent = "";
    $("ask").disabled = true;
    const source = new EventSource(`/runs/${encodeURIComponent(name)}/chat/stream?q=${encodeURIComponent(q)}`);
    const finish = () => { source.close(); $("ask").disabled = false; };
    source.onmessage = (message) => {
      const e = JSON.parse(message.data);
      if (e.side) $(`answer-${e.side}`).textContent += e.text;
      if (e.error) $("answer-tuned").textContent = e.error;
      if (e.done) { finish(); $("chat-form").dataset.done = "1"; }
    };
    source.onerror = finish;
  });
}

// ---- Results and Export pages: follow a job, reload when it ends ----
function watchJob(name, running) {
  if (!running) return;
  const box = $("job");
  const words = JSON.parse(box.dataset.words);
  const source = new EventSource(`/runs/${encodeURIComponent(name)}/events`);
  source.onmessage = (message) => {
    const job = JSON.parse(message.data).job;
    if (!job) return;
    box.innerHTML = "";
    const state = document.createElement("p");
    state.className = "job-state";
    state.textContent = `${job.kind}: ${fill(words[job.state], { s: job.seconds })}`;
    const log = document.createElement("pre");
    log.className = "log";
    log.textContent = job.lines.join("\n") + (job.error ? `\n${job.error}` : "");
    box.append(state, log);
    if (job.state !== "running") { source.close(); location.reload(); }
  };
}

window.addEventListener("DOMContentLoaded", () => {
  const settings = $("settings-form");
  if (settings) watchSettings(settings);
});
