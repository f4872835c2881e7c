// The try-it page: uploads each chosen image to POST /classify (one request per image, so one
// broken file fails only its own card) and draws the answer: top-k bars, and the attention
// rollout grid as a heatmap over the part of the image the model saw. No dependencies.
"use strict";

(() => {
  const MAX_PARALLEL = 4; // requests in flight at once; the server batches them anyway
  const CANVAS_MIN_SIDE = 384; // small images are enlarged (pixelated) so patches are visible
  const CANVAS_MAX_SIDE = 1024; // large photos are drawn smaller: the heatmap is coarse anyway

  // The nine stops of matplotlib's inferno, as app/rollout.py colours its PNG heatmaps.
  const INFERNO_STOPS = [
    [0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85],
    [227, 89, 51], [249, 140, 10], [249, 201, 50], [252, 255, 164],
  ];
  const LUT = (() => {
    const lut = new Uint8ClampedArray(256 * 3);
    const last = INFERNO_STOPS.length - 1;
    for (let i = 0; i < 256; i++) {
      const at = (i / 255) * last;
      const lo = Math.min(Math.floor(at), last - 1);
      const t = at - lo;
      for (let c = 0; c < 3; c++) {
        lut[i * 3 + c] = Math.round(INFERNO_STOPS[lo][c] * (1 - t) + INFERNO_STOPS[lo + 1][c] * t);
      }
    }
    return lut;
  })();

  const el = {
    form: document.getElementById("controls"),
    drop: document.getElementById("drop"),
    files: document.getElementById("files"),
    model: document.getElementById("model"),
    version: document.getElementById("version"),
    topK: document.getElementById("top-k"),
    headFusion: document.getElementById("head-fusion"),
    discardRatio: document.getElementById("discard-ratio"),
    classify: document.getElementById("classify"),
    clear: document.getElementById("clear"),
    opacity: document.getElementById("opacity"),
    opacityValue: document.getElementById("opacity-value"),
    showGrid: document.getElementById("show-grid"),
    serverError: document.getElementById("server-error"),
    modelInfo: document.getElementById("model-info"),
    results: document.getElementById("results"),
    template: document.getElementById("result-template"),
  };

  const state = {
    models: [], // GET /models: models[]
    items: [], // one per chosen file: {file, url, image, card, result}
    run: null, // AbortController of the requests in flight
  };

  // ---- API errors, worded by the API --------------------------------------------------------

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status; // 0: the request never got an HTTP answer
      this.detail = detail;
    }
  }

  async function readBody(response) {
    const text = await response.text();
    try {
      return JSON.parse(text);
    } catch {
      return null; // e.g. an HTML error page from a proxy in front of the service
    }
  }

  function errorOf(response, body) {
    // The service always answers {"detail": "..."}: show those words as they are.
    if (body && typeof body.detail === "string") return new ApiError(response.status, body.detail);
    if (body && body.detail !== undefined) {
      return new ApiError(response.status, JSON.stringify(body.detail));
    }
    const reason = response.statusText ? ` ${response.statusText}` : "";
    return new ApiError(response.status, `the server answered HTTP ${response.status}${reason}`);
  }

  async function fetchJson(url, options) {
    let response;
    try {
      response = await fetch(url, options);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, `could not reach the server (${err.message})`);
    }
    const body = await readBody(response);
    if (!response.ok) throw errorOf(response, body);
    if (body === null) throw new ApiError(response.status, "the server's answer was not JSON");
    return { body, response };
  }

  function showError(node, err) {
    node.replaceChildren();
    if (err instanceof ApiError && err.status > 0) {
      const status = document.createElement("strong");
      status.className = "status-code";
      status.textContent = `HTTP ${err.status}`;
      node.append(status, " ");
    }
    const detail = document.createElement("span");
    detail.className = "detail";
    detail.textContent = err instanceof ApiError ? err.detail : String(err);
    node.append(detail);
    node.hidden = false;
  }

  // ---- models --------------------------------------------------------------------------------

  function currentModel() {
    return state.models.find((m) => m.name === el.model.value) || null;
  }

  function currentVersion() {
    const model = currentModel();
    return model ? Number(el.version.value || model.default_version) : null;
  }

  function hasRollout() {
    const model = currentModel();
    return model !== null && model.rollout_versions.includes(currentVersion());
  }

  function fillVersions() {
    const model = currentModel();
    el.version.replaceChildren();
    if (!model) return;
    for (const v of [...model.versions].reverse()) {
      const form = versionForm(model, v);
      const notes = [form, v === model.default_version ? "default" : ""].filter(Boolean);
      const option = new Option(
        notes.length ? `${v} (${notes.join(", ")})` : String(v), String(v),
      );
      option.selected = v === model.default_version;
      el.version.append(option);
    }
    el.version.disabled = model.versions.length < 2;
    el.topK.max = String(model.num_classes);
    if (Number(el.topK.value) > model.num_classes) el.topK.value = String(model.num_classes);
    describeModel();
  }

  // A version's graph form as /models reports it: none, fused, fp16 or int8.
  function versionForm(model, version) {
    const forms = model.version_optimization || {};
    return forms[String(version)]
      || (version === model.default_version ? model.optimization : "");
  }

  function describeModel() {
    const model = currentModel();
    if (!model) return;
    const [gh, gw] = model.native_grid;
    const [h, w] = model.input_size;
    const pre = model.preprocess;
    const crop = pre.resize_mode === "squash"
      ? "squashed to the input size"
      : `shorter side to ${Math.floor(Math.min(h, w) / pre.crop_pct)} px, centre crop`;
    const rollout = hasRollout() ? "" : " · no rollout graph in this version: no heatmap";
    const form = versionForm(model, currentVersion());
    const graph = form === "int8" ? "int8 graph (rollout maps from the fp32 graph)"
      : form ? `${form} graph` : "graph";
    el.modelInfo.textContent =
      `${model.name} v${currentVersion()}: ${model.num_classes} classes, ` +
      (model.backbone ? `hybrid: ${model.backbone}, tokens of ` : "patch ") +
      `${model.patch_size} px, native grid ${gh}×${gw} (${w}×${h} px; crop: ${crop}), ` +
      `${graph} on ${model.provider}${rollout}`;
  }

  async function loadModels() {
    try {
      const { body } = await fetchJson("/models");
      state.models = body.models;
      el.model.replaceChildren();
      for (const m of body.models) {
        const option = new Option(m.default ? `${m.name} (default)` : m.name, m.name);
        option.selected = m.name === body.default_model;
        el.model.append(option);
      }
      el.model.disabled = false;
      el.serverError.hidden = true;
      fillVersions();
      updateButtons();
      if (state.items.length) classifyAll();
    } catch (err) {
      showError(el.serverError, err);
      // 503 while the models load: ask again shortly (the service sends Retry-After: 1).
      if (err instanceof ApiError && (err.status === 503 || err.status === 0)) {
        setTimeout(loadModels, 2000);
      }
    }
  }

  // ---- choosing files --------------------------------------------------------------------------

  function loadPreview(url) {
    // Browsers apply EXIF orientation here, as the service does before it resizes.
    const image = new Image();
    image.src = url;
    return image.decode().then(() => image, () => null);
  }

  function addFiles(fileList) {
    const files = [...fileList];
    if (!files.length) return;
    clearItems();
    for (const file of files) {
      const url = URL.createObjectURL(file);
      const card = el.template.content.firstElementChild.cloneNode(true);
      card.querySelector(".card-title").textContent = file.name || "image";
      el.results.append(card);
      const item = { file, url, card, image: null, result: null };
      item.ready = loadPreview(url).then((image) => {
        item.image = image;
        draw(item);
      });
      state.items.push(item);
    }
    updateButtons();
    classifyAll();
  }

  function clearItems() {
    if (state.run) state.run.abort();
    for (const item of state.items) URL.revokeObjectURL(item.url);
    state.items = [];
    el.results.replaceChildren();
    updateButtons();
  }

  function updateButtons() {
    el.classify.disabled = !state.items.length || !currentModel();
    el.clear.disabled = !state.items.length;
  }

  // ---- classifying ---------------------------------------------------------------------------

  function query() {
    const params = new URLSearchParams({
      model: el.model.value,
      version: String(currentVersion()),
      top_k: el.topK.value.trim(),
      resize: el.form.elements.resize.value,
    });
    if (hasRollout()) {
      params.set("rollout", "true");
      params.set("head_fusion", el.headFusion.value);
      params.set("discard_ratio", el.discardRatio.value.trim());
    }
    return params;
  }

  async function classifyAll() {
    if (!currentModel() || !state.items.length) return;
    if (state.run) state.run.abort();
    const run = new AbortController();
    state.run = run;
    const params = query();
    const model = currentModel();
    const pending = [...state.items];
    for (const item of pending) setPending(item);
    const worker = async () => {
      while (pending.length && !run.signal.aborted) {
        await classifyOne(pending.shift(), params, model, run.signal);
      }
    };
    await Promise.all(Array.from({ length: MAX_PARALLEL }, worker));
  }

  async function classifyOne(item, params, model, signal) {
    const form = new FormData();
    form.append("image", item.file, item.file.name || "image");
    const started = performance.now();
    try {
      const { body } = await fetchJson(`/classify?${params}`, {
        method: "POST",
        body: form,
        signal,
      });
      const pageMs = performance.now() - started;
      await item.ready;
      if (signal.aborted) return;
      item.result = { ...body.results[0], timing: body.timing, pageMs, model, version: body.version };
      showResult(item);
    } catch (err) {
      if (signal.aborted || err.name === "AbortError") return;
      item.result = null;
      item.card.dataset.state = "error";
      item.card.removeAttribute("aria-busy");
      item.card.querySelector(".status").hidden = true;
      showError(item.card.querySelector(".error"), err);
      item.card.querySelector(".bars").replaceChildren();
      item.card.querySelector(".facts").replaceChildren();
      draw(item);
    }
  }

  function setPending(item) {
    const card = item.card;
    card.dataset.state = "pending";
    card.setAttribute("aria-busy", "true");
    const status = card.querySelector(".status");
    status.textContent = "Classifying…";
    status.hidden = false;
    card.querySelector(".error").hidden = true;
  }

  // ---- showing an answer -----------------------------------------------------------------------

  function percent(score) {
    const p = score * 100;
    return p >= 0.1 || p === 0 ? `${p.toFixed(1)}%` : "<0.1%";
  }

  function showResult(item) {
    const { card, result } = item;
    card.querySelector(".status").hidden = true;
    card.querySelector(".error").hidden = true;

    const bars = card.querySelector(".bars");
    bars.replaceChildren();
    for (const p of result.predictions) {
      const li = document.createElement("li");
      li.className = "bar";
      li.dataset.label = p.label;
      li.dataset.score = String(p.score);
      const label = document.createElement("span");
      label.className = "bar-label";
      label.textContent = p.label;
      const track = document.createElement("span");
      track.className = "bar-track";
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      fill.style.width = `${Math.max(0, Math.min(1, p.score)) * 100}%`;
      track.append(fill);
      const score = document.createElement("span");
      score.className = "bar-score";
      score.textContent = percent(p.score);
      li.append(label, track, score);
      bars.append(li);
    }

    const [gh, gw] = result.grid;
    const [iw, ih] = result.image_size;
    const P = result.model.patch_size;
    const facts = [
      ["Patch grid", `${gh} × ${gw} (${gh * gw} patches of ${P} px)`],
      ["Image", `${iw} × ${ih} px`],
      ["Model saw", seenText(result)],
      ["Latency", latencyText(result)],
    ];
    if (result.rollout) {
      facts.push([
        "Rollout",
        `head fusion ${result.rollout.head_fusion}, discard ratio ${result.rollout.discard_ratio}`,
      ]);
    } else {
      facts.push(["Rollout", "not available for this model version"]);
    }
    const dl = card.querySelector(".facts");
    dl.replaceChildren();
    for (const [name, value] of facts) {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = value;
      dd.dataset.fact = name.toLowerCase().replace(/\s+/g, "-");
      dl.append(dt, dd);
    }
    draw(item);
    card.dataset.state = "done";
    card.removeAttribute("aria-busy");
  }

  function seenText(result) {
    const [gh, gw] = result.grid;
    const P = result.model.patch_size;
    const size = `${gw * P} × ${gh * P} px`;
    if (result.resize === "fit") return `whole image, resized to ${size}`;
    const pre = result.model.preprocess;
    if (pre.resize_mode === "squash") return `whole image, squashed to ${size}`;
    const box = seenBox(result.image_size[0], result.image_size[1], result.resize, result.model);
    const part = whole(box, result.image_size)
      ? "whole image"
      : `centre ${box[2] - box[0]} × ${box[3] - box[1]} px of it`;
    return `${part}, resized to ${size} (crop_pct ${pre.crop_pct})`;
  }

  function latencyText(result) {
    const t = result.timing;
    const page = `${Math.round(result.pageMs)} ms in the page`;
    if (!t) return page;
    return `${page}; server ${t.total_ms.toFixed(1)} ms (preprocess ${t.preprocess_ms.toFixed(1)}, ` +
      `queue + inference ${t.inference_ms.toFixed(1)})`;
  }

  // ---- geometry: what part of the image the patch grid covers (app/imaging.py's crop_plan) -----

  function roundHalfEven(x) {
    // Python's round(): the service's crop arithmetic rounds halves to even.
    const f = Math.floor(x);
    const d = x - f;
    if (d > 0.5) return f + 1;
    if (d < 0.5) return f;
    return f % 2 === 0 ? f : f + 1;
  }

  function seenBox(width, height, resize, model) {
    // (left, top, right, bottom) in original pixels: `fit` and `squash` see the whole image.
    if (resize === "fit" || model.preprocess.resize_mode === "squash") return [0, 0, width, height];
    const [inH, inW] = model.input_size;
    const cropPct = model.preprocess.crop_pct;
    const targetH = Math.floor(inH / cropPct);
    const targetW = Math.floor(inW / cropPct);
    let newW;
    let newH;
    if (targetH === targetW) {
      if (width <= height) {
        newW = targetW;
        newH = Math.trunc((targetW * height) / width);
      } else {
        newW = Math.trunc((targetH * width) / height);
        newH = targetH;
      }
    } else {
      const ratio = Math.min(height / targetH, width / targetW);
      newW = roundHalfEven(width / ratio);
      newH = roundHalfEven(height / ratio);
    }
    const top = roundHalfEven((newH - inH) / 2);
    const left = roundHalfEven((newW - inW) / 2);
    const sx = width / newW;
    const sy = height / newH;
    const x0 = Math.min(Math.max(roundHalfEven(left * sx), 0), width - 1);
    const y0 = Math.min(Math.max(roundHalfEven(top * sy), 0), height - 1);
    const x1 = Math.min(Math.max(roundHalfEven((left + inW) * sx), x0 + 1), width);
    const y1 = Math.min(Math.max(roundHalfEven((top + inH) * sy), y0 + 1), height);
    return [x0, y0, x1, y1];
  }

  // ---- drawing ---------------------------------------------------------------------------------

  function canvasSize(width, height) {
    const long = Math.max(width, height);
    let scale = 1;
    if (long < CANVAS_MIN_SIDE) scale = Math.floor(CANVAS_MIN_SIDE / long) || 1;
    else if (long > CANVAS_MAX_SIDE) scale = CANVAS_MAX_SIDE / long;
    return [Math.max(1, Math.round(width * scale)), Math.max(1, Math.round(height * scale))];
  }

  function draw(item) {
    const { card, image, result } = item;
    // The service's image size (after EXIF orientation) is the frame the grid is placed in.
    const size = result
      ? result.image_size
      : image
        ? [image.naturalWidth, image.naturalHeight]
        : null;
    const figure = card.querySelector(".picture");
    figure.hidden = size === null;
    if (size === null) return;
    const [w, h] = canvasSize(size[0], size[1]);
    const photo = card.querySelector(".photo");
    const heat = card.querySelector(".heat");
    const lines = card.querySelector(".gridlines");
    for (const canvas of [photo, heat, lines]) {
      canvas.width = w;
      canvas.height = h;
    }

    const ctx = photo.getContext("2d");
    if (image) {
      ctx.imageSmoothingEnabled = w < size[0] || w % size[0] !== 0;
      ctx.imageSmoothingQuality = "high";
      ctx.drawImage(image, 0, 0, w, h);
      const withHeat = result && result.rollout ? " with its attention heatmap" : "";
      photo.setAttribute("aria-label", `${item.file.name}${withHeat}`);
    } else {
      ctx.fillStyle = "#d8d8d8";
      ctx.fillRect(0, 0, w, h);
      photo.setAttribute("aria-label", `${item.file.name}: this browser cannot show the image`);
    }
    const caption = card.querySelector(".caption");
    const notes = image ? [] : ["This browser cannot show this image."];
    caption.textContent = notes.join(" ");

    heat.getContext("2d").clearRect(0, 0, w, h);
    lines.getContext("2d").clearRect(0, 0, w, h);
    heat.hidden = true;
    if (!result) return;

    const box = seenBox(size[0], size[1], result.resize, result.model);
    const sx = w / size[0];
    const sy = h / size[1];
    const [x0, y0, x1, y1] = [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy];
    if (result.rollout) {
      drawHeat(heat, result.rollout.grid, [x0, y0, x1, y1]);
      heat.hidden = false;
      const where = whole(box, size) ? "the whole image" : "the centre crop the model saw";
      notes.push(`Heatmap: attention rollout over ${where}.`);
    }
    caption.textContent = notes.join(" ");
    drawLines(lines, result.grid, [x0, y0, x1, y1], whole(box, size), el.showGrid.checked);
  }

  function whole([x0, y0, x1, y1], [width, height]) {
    return x0 === 0 && y0 === 0 && x1 === width && y1 === height;
  }

  function drawHeat(canvas, grid, [x0, y0, x1, y1]) {
    const gh = grid.length;
    const gw = gh ? grid[0].length : 0;
    if (!gh || !gw) return;
    const small = document.createElement("canvas");
    small.width = gw;
    small.height = gh;
    const sctx = small.getContext("2d");
    const pixels = sctx.createImageData(gw, gh);
    for (let r = 0; r < gh; r++) {
      for (let c = 0; c < gw; c++) {
        const v = Number(grid[r][c]);
        const level = Math.round(Math.min(1, Math.max(0, Number.isFinite(v) ? v : 0)) * 255);
        const o = (r * gw + c) * 4;
        pixels.data[o] = LUT[level * 3];
        pixels.data[o + 1] = LUT[level * 3 + 1];
        pixels.data[o + 2] = LUT[level * 3 + 2];
        pixels.data[o + 3] = 255;
      }
    }
    sctx.putImageData(pixels, 0, 0);
    const ctx = canvas.getContext("2d");
    // Bilinear upsampling, as the service's PNG heatmap does.
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(small, 0, 0, gw, gh, x0, y0, x1 - x0, y1 - y0);
  }

  function drawLines(canvas, [gh, gw], [x0, y0, x1, y1], isWhole, showGrid) {
    const ctx = canvas.getContext("2d");
    if (!isWhole) {
      // Dim what the model never saw (outside the centre crop) and outline what it did.
      ctx.fillStyle = "rgba(0, 0, 0, 0.45)";
      ctx.beginPath();
      ctx.rect(0, 0, canvas.width, canvas.height);
      ctx.rect(x0, y0, x1 - x0, y1 - y0);
      ctx.fill("evenodd");
      ctx.setLineDash([6, 4]);
      ctx.lineWidth = 2;
      ctx.strokeStyle = "#ffffff";
      ctx.strokeRect(x0 + 1, y0 + 1, x1 - x0 - 2, y1 - y0 - 2);
      ctx.setLineDash([]);
    }
    if (!showGrid) return;
    ctx.lineWidth = 1;
    ctx.strokeStyle = "rgba(255, 255, 255, 0.7)";
    ctx.beginPath();
    for (let r = 1; r < gh; r++) {
      const y = Math.round(y0 + ((y1 - y0) * r) / gh) + 0.5;
      ctx.moveTo(x0, y);
      ctx.lineTo(x1, y);
    }
    for (let c = 1; c < gw; c++) {
      const x = Math.round(x0 + ((x1 - x0) * c) / gw) + 0.5;
      ctx.moveTo(x, y0);
      ctx.lineTo(x, y1);
    }
    ctx.stroke();
  }

  function setOpacity() {
    const value = Number(el.opacity.value);
    el.results.style.setProperty("--heat-opacity", String(value));
    el.opacityValue.textContent = `${Math.round(value * 100)}%`;
  }

  // ---- wiring --------------------------------------------------------------------------------

  el.files.addEventListener("change", () => {
    addFiles(el.files.files);
    // Choosing the same file again should classify it again.
    el.files.value = "";
  });

  // Drop anywhere on the page (a near miss must not navigate away to the dropped file).
  const carriesFiles = (event) =>
    Boolean(event.dataTransfer) && [...event.dataTransfer.types].includes("Files");
  let dragDepth = 0;
  document.addEventListener("dragenter", (event) => {
    if (!carriesFiles(event)) return;
    dragDepth += 1;
    el.drop.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (!carriesFiles(event)) return;
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) el.drop.classList.remove("dragging");
  });
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    if (event.dataTransfer) event.dataTransfer.dropEffect = "copy";
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    dragDepth = 0;
    el.drop.classList.remove("dragging");
    if (event.dataTransfer && event.dataTransfer.files.length) addFiles(event.dataTransfer.files);
  });

  el.form.addEventListener("submit", (event) => {
    event.preventDefault();
    classifyAll();
  });
  el.model.addEventListener("change", () => {
    fillVersions();
    classifyAll();
  });
  el.version.addEventListener("change", () => {
    describeModel();
    classifyAll();
  });
  for (const input of [el.topK, el.headFusion, el.discardRatio, ...el.form.elements.resize]) {
    input.addEventListener("change", () => classifyAll());
  }
  el.clear.addEventListener("click", () => {
    clearItems();
    el.files.focus();
  });
  el.opacity.addEventListener("input", setOpacity);
  el.showGrid.addEventListener("change", () => {
    for (const item of state.items) draw(item);
  });

  setOpacity();
  loadModels();
})();
