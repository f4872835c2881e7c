// What the model learned (Fig. 7 of the ViT paper): GET /models/{name}/introspection draws the
// three panels; POST .../introspection/attention-distance measures one image. It reads the
// model and version chosen in the page's own controls and touches nothing else of page.js.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    model: $("model"),
    version: $("version"),
    show: $("learned-show"),
    grid: $("learned-grid"),
    error: $("learned-error"),
    panels: $("learned-panels"),
    filters: $("learned-filters"),
    filtersCaption: $("learned-filters-caption"),
    similarity: $("learned-similarity"),
    similarityCaption: $("learned-similarity-caption"),
    resampledFigure: $("learned-resampled-figure"),
    resampled: $("learned-resampled"),
    resampledCaption: $("learned-resampled-caption"),
    distance: $("learned-distance"),
    distanceCaption: $("learned-distance-caption"),
    image: $("learned-image"),
    imageFigure: $("learned-image-figure"),
    imageDistance: $("learned-image-distance"),
    imageCaption: $("learned-image-caption"),
  };

  const png = (base64) => `data:image/png;base64,${base64}`;

  function query() {
    const params = new URLSearchParams();
    if (el.version.value) params.set("version", el.version.value);
    return params;
  }

  async function call(url, options) {
    let response;
    try {
      response = await fetch(url, options);
    } catch (err) {
      throw new Error(`could not reach the server (${err.message})`);
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (!response.ok) {
      const detail = body && typeof body.detail === "string" ? body.detail
        : `the server answered HTTP ${response.status}`;
      throw new Error(`HTTP ${response.status} ${detail}`);
    }
    return body;
  }

  function fail(err) {
    el.error.textContent = err.message;
    el.error.hidden = false;
  }

  async function show() {
    el.error.hidden = true;
    const params = query();
    const grid = el.grid.value.trim();
    if (grid) params.set("grid", grid);
    try {
      const body = await call(
        `/models/${encodeURIComponent(el.model.value)}/introspection?${params}`);
      const f = body.filters;
      el.filters.src = png(f.png);
      el.filtersCaption.textContent =
        `First ${f.components.length} principal components of ${f.shown}.`;
      const native = body.position_similarity.native;
      el.similarity.src = png(native.png);
      el.similarityCaption.textContent =
        `Position embedding similarity at the native ${native.grid[0]}×${native.grid[1]} grid ` +
        "(tile: one patch's cosine similarity with every patch, -1 to 1).";
      const resampled = body.position_similarity.resampled;
      el.resampledFigure.hidden = !resampled;
      if (resampled) {
        el.resampled.src = png(resampled.png);
        el.resampledCaption.textContent =
          `Resampled to ${resampled.grid[0]}×${resampled.grid[1]}, as the served graph does.`;
      }
      const d = body.attention_distance;
      if (d) {
        el.distance.src = png(d.png);
        el.distanceCaption.textContent =
          `Mean attention distance (pixels) per head and depth over ${d.images} held-out ` +
          `images (${d.held_out}).`;
      } else {
        el.distance.removeAttribute("src");
        el.distanceCaption.textContent = "No held-out images were measured at export.";
      }
      el.panels.hidden = false;
    } catch (err) {
      fail(err);
    }
  }

  async function measure() {
    const file = el.image.files && el.image.files[0];
    if (!file) return;
    el.error.hidden = true;
    const form = new FormData();
    form.append("image", file, file.name);
    try {
      const body = await call(
        `/models/${encodeURIComponent(el.model.value)}/introspection/attention-distance?${query()}`,
        { method: "POST", body: form });
      el.imageDistance.src = png(body.png);
      el.imageCaption.textContent =
        `${file.name}: mean attention distance per head and depth over its ` +
        `${body.grid[0]}×${body.grid[1]} grid.`;
      el.imageFigure.hidden = false;
    } catch (err) {
      fail(err);
    }
    el.image.value = "";
  }

  // The model list arrives from page.js; the button waits for a model to be chosen.
  const ready = () => { el.show.disabled = el.model.disabled || !el.model.value; };
  new MutationObserver(ready).observe(el.model, { attributes: true, childList: true });
  el.model.addEventListener("change", () => { el.panels.hidden = true; ready(); });
  el.show.addEventListener("click", show);
  el.grid.addEventListener("keydown", (event) => {
    if (event.key === "Enter") { event.preventDefault(); show(); }
  });
  el.image.addEventListener("change", measure);
  ready();
})();
