// pneumoscope page: upload one X-ray, show probabilities, decision, uncertainty and the Grad-CAM overlay.
// Everything is served by the app itself (no CDN); results are never stored.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const status = $("status");

  function setStatus(text, isError) {
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  function percent(p) {
    return (100 * p).toFixed(1) + "%";
  }

  async function loadModel() {
    try {
      const r = await fetch("/v1/model");
      const m = await r.json();
      if (!r.ok) throw new Error(m.error || r.statusText);
      const thr = m.threshold === null ? "argmax" : m.threshold.toFixed(3) + (m.threshold_rule ? " (" + m.threshold_rule + ")" : "");
      $("model").textContent = "Model " + m.model_id + " \u00b7 version " + m.model_version + " \u00b7 " + m.backend +
        " \u00b7 classes " + m.classes.join(", ") + " \u00b7 threshold " + thr;
    } catch (err) {
      $("model").textContent = "model information unavailable: " + err.message;
    }
  }

  async function post(endpoint, file) {
    const form = new FormData();
    form.append("files", file, file.name);
    const r = await fetch(endpoint, { method: "POST", body: form });
    let body = null;
    try { body = await r.json(); } catch (e) { body = { error: r.statusText }; }
    return { ok: r.ok, status: r.status, body: body };
  }

  function showBars(pred) {
    const bars = $("bars");
    bars.replaceChildren();
    for (const [cls, p] of Object.entries(pred.probabilities)) {
      const bar = document.createElement("div");
      bar.className = "bar" + (cls === pred.decision ? " decided" : "");
      bar.dataset.cls = cls;
      const label = document.createElement("div");
      label.className = "bar-label";
      const name = document.createElement("span");
      name.textContent = cls;
      const value = document.createElement("span");
      value.className = "prob";
      value.textContent = percent(p);
      label.append(name, value);
      const track = document.createElement("div");
      track.className = "bar-track";
      track.setAttribute("role", "meter");
      track.setAttribute("aria-valuemin", "0");
      track.setAttribute("aria-valuemax", "1");
      track.setAttribute("aria-valuenow", String(p));
      track.setAttribute("aria-label", "probability of " + cls);
      const fill = document.createElement("div");
      fill.className = "bar-fill";
      fill.style.width = (100 * p).toFixed(2) + "%";
      track.append(fill);
      bar.append(label, track);
      bars.append(bar);
    }
  }

  function showResult(answer, file, localUrl) {
    const pred = answer.predictions[0];
    $("filename").textContent = pred.filename;
    $("decision").textContent = pred.decision;
    $("threshold").textContent = pred.threshold === null ? "argmax" : pred.threshold.toFixed(3);
    $("uncertainty").textContent = pred.uncertainty.toFixed(3);
    $("refer").hidden = !pred.refer;
    $("model-id").textContent = answer.model_id;
    $("model-version").textContent = answer.model_version;
    showBars(pred);
    const cam = $("cam");
    if (pred.cam_png_base64) {
      $("xray").src = "data:image/png;base64," + pred.image_png_base64;
      cam.src = "data:image/png;base64," + pred.cam_png_base64;
      cam.hidden = false;
      $("opacity-row").hidden = false;
      $("cam-note").textContent = "Grad-CAM of \u201c" + pred.cam_class + "\u201d: where the network looked, not a lesion map.";
      setOpacity();
    } else {
      $("xray").src = localUrl;
      cam.hidden = true;
      cam.removeAttribute("src");
      $("opacity-row").hidden = true;
    }
    $("result").hidden = false;
  }

  function setOpacity() {
    const v = Number($("opacity").value);
    $("cam").style.opacity = String(v / 100);
    $("opacity-value").textContent = v + "%";
  }

  let busy = false;
  async function analyse(file) {
    if (!file || busy) return;
    busy = true;
    setStatus("Analysing " + file.name + "\u2026", false);
    const localUrl = URL.createObjectURL(file);
    try {
      let res = await post("/v1/explain", file);
      if (res.status === 409 || res.status === 501) {
        $("cam-note").textContent = "Grad-CAM unavailable: " + res.body.error;
        res = await post("/v1/predict", file);
      } else {
        $("cam-note").textContent = "";
      }
      if (!res.ok) {
        setStatus("Error: " + (res.body.error || ("HTTP " + res.status)) + (res.body.file ? " (" + res.body.file + ")" : ""), true);
        return;
      }
      showResult(res.body, file, localUrl);
      setStatus("Done.", false);
    } catch (err) {
      setStatus("Error: " + err.message, true);
    } finally {
      busy = false;
    }
  }

  function init() {
    const drop = $("drop");
    $("file").addEventListener("change", (e) => analyse(e.target.files[0]));
    $("opacity").addEventListener("input", setOpacity);
    ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    }));
    ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => {
      e.preventDefault();
      drop.classList.remove("over");
    }));
    drop.addEventListener("drop", (e) => analyse(e.dataTransfer.files[0]));
    drop.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") $("file").click();
    });
    loadModel();
  }

  init();
})();
