// app.mjs: the page's glue (index.html): reads the files the user picks, decodes the photo
// with the browser's own decoder, calls segment.mjs, and shows and offers the mask.
//
// onnxruntime-web 1.31.1: the copy `npm install` puts in node_modules, pinned by
// package.json and package-lock.json (the version tests/test_web.py checks). Without
// npm, the same file from a CDN, pinned by its URL:
//   import * as ort from "https://cdn.jsdelivr.net/npm/onnxruntime-web@1.31.1/dist/ort.wasm.min.mjs";
import * as ort from "./node_modules/onnxruntime-web/dist/ort.wasm.min.mjs";
import {
  checkExport, createSession, MEMORY_BUDGET, predictionSettings, segment,
} from "./segment.mjs";

const $ = (id) => document.getElementById(id);
// predict's colours for classes 1, 2, ... in its --viz overlay (class 0 stays uncoloured).
const CLASS_COLOURS = [[230, 26, 26], [26, 140, 242], [26, 204, 64], [242, 191, 13],
  [179, 51, 217], [13, 217, 217]];
let model = null;  // {session, sidecar, name} once a model and its settings are loaded

/** Shows one line of progress, or an error in red. */
function say(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

/** segment()'s options from the page: tiles as predict --tile ("tile") or --no-tile
 * ("pass") would take them, or the run's own way ("auto"); the memory budget in MiB. */
function options() {
  const [tiles, mebibytes] = [$("tiles").value, Number($("budget").value)];
  if (!(mebibytes > 0)) throw new Error("Give the memory budget in MiB, e.g. 2048.");
  return { tile: tiles === "auto" ? undefined : tiles === "tile",
    memoryBudget: mebibytes * 2 ** 20 };
}

/** Says how the loaded model segments photos with the page's options. */
function describe() {
  const settings = predictionSettings(model.sidecar, options());
  const [height, width] = settings.image_size;
  const [tileHeight, tileWidth] = settings.tile;
  const tiles = `in tiles of ${tileWidth}x${tileHeight} overlapping by ${settings.overlap}`;
  let how = settings.mode === "resize" ? `resizes photos to ${width}x${height}`
    : settings.mode === "tile" ? `takes photos at scale ${settings.scale} ${tiles}`
      : `takes whole photos at scale ${settings.scale}`;
  if (settings.auto) {
    how += `, ${tiles} where one pass would need over ${settings.memoryBudget / 2 ** 20} MiB`;
  } else if (settings.mode === "whole" && $("tiles").value === "auto") {
    how += " in one pass (its settings file predates the memory a pass takes: export the "
      + "run again for tiles where a pass would not fit)";
  }
  const flips = settings.tta === "none" ? "" : `, test-time flips "${settings.tta}"`;
  say(`${model.name}: ${how}, ${settings.in_channels === 3 ? "RGB" : "grayscale"}, `
    + `${settings.num_classes} class(es)${flips}. Pick a photo.`);
}

/** The model and its settings as the session to run: the settings are checked first, so
 * that a run this page does not implement is refused (with the settings file's own
 * words for what predict does) before the model is loaded, as is a settings file of
 * another export. */
async function load(modelBytes, sidecar, name, sidecarName) {
  model = null;
  await checkExport(sidecar, sidecarName, modelBytes, name);
  predictionSettings(sidecar);
  const session = await createSession(ort, modelBytes, name);
  model = { session, sidecar, name };
  describe();
}

/** The photo's pixels, RGBA: decoded by the browser, turned upright by its EXIF
 * orientation as viewers show it (and as predict turns it), and without colour
 * management, so that the values are the file's own, as Pillow reads them. */
async function decode(file) {
  const bitmap = await createImageBitmap(file, {
    imageOrientation: "from-image", colorSpaceConversion: "none", premultiplyAlpha: "none",
  });
  const canvas = document.createElement("canvas");
  [canvas.width, canvas.height] = [bitmap.width, bitmap.height];
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  const { data } = context.getImageData(0, 0, bitmap.width, bitmap.height);
  return { data: new Uint8Array(data.buffer), width: bitmap.width, height: bitmap.height, channels: 4 };
}

/** The photo with its mask laid over, as predict's --viz overlay: half the photo and
 * half its class's colour where the mask is not background. */
function showOverlay(picture, mask) {
  const canvas = $("overlay");
  [canvas.width, canvas.height] = [picture.width, picture.height];
  const shown = new ImageData(picture.width, picture.height);
  for (let i = 0; i < mask.length; i++) {
    const colour = mask[i] && CLASS_COLOURS[(mask[i] === 255 ? 0 : mask[i] - 1) % CLASS_COLOURS.length];
    for (let c = 0; c < 3; c++) {
      const value = picture.data[i * 4 + c];
      shown.data[i * 4 + c] = colour ? (value + colour[c]) / 2 : value;
    }
    shown.data[i * 4 + 3] = 255;
  }
  canvas.getContext("2d").putImageData(shown, 0, 0);
  canvas.hidden = false;
}

/** The mask as a PNG to download, named as predict names it (<name>_mask.png): grey
 * levels equal to the mask's values (0/255 for one class, the class ids for several),
 * stored as RGBA, the one form a canvas writes. */
function offerDownload(mask, width, height, photoName) {
  const canvas = document.createElement("canvas");
  [canvas.width, canvas.height] = [width, height];
  const grey = new ImageData(width, height);
  for (let i = 0; i < mask.length; i++) {
    grey.data.fill(mask[i], i * 4, i * 4 + 3);  // R = G = B
    grey.data[i * 4 + 3] = 255;
  }
  canvas.getContext("2d").putImageData(grey, 0, 0);
  canvas.toBlob((blob) => {
    const link = $("download");
    if (link.href) URL.revokeObjectURL(link.href);
    link.href = URL.createObjectURL(blob);
    link.download = `${photoName.replace(/\.[^.]*$/, "")}_mask.png`;
    link.hidden = false;
  }, "image/png");
}

/** The model picked in the two file inputs, once both are there. */
async function modelPicked() {
  const [onnxFile, sidecarFile] = [$("model").files[0], $("sidecar").files[0]];
  if (!onnxFile || !sidecarFile) return;
  say(`loading ${onnxFile.name}...`);
  let sidecar;
  try {
    sidecar = JSON.parse(await sidecarFile.text());
  } catch (error) {
    throw new Error(`${sidecarFile.name} is not the export's JSON settings file `
      + `(${error.message}); give the MODEL.onnx.json experiments.export wrote`);
  }
  await load(new Uint8Array(await onnxFile.arrayBuffer()), sidecar, onnxFile.name,
    sidecarFile.name);
}

/** Segments the photo picked, shows it with its mask and offers the mask. */
async function photoPicked() {
  const file = $("photo").files[0];
  if (!file) return;
  if (!model) throw new Error("Pick the model (.onnx) and its settings (.json) first.");
  say(`segmenting ${file.name}...`);
  const started = performance.now();
  const picture = await decode(file);
  const { mask, width, height, how } = await segment(ort, model.session, model.sidecar, picture,
    options());
  showOverlay(picture, mask);
  offerDownload(mask, width, height, file.name);
  const foreground = mask.reduce((n, v) => n + (v > 0), 0) / mask.length;
  say(`${file.name}: ${width}x${height}, ${how === "tile" ? "in tiles" : "in one pass"}, `
    + `${(100 * foreground).toFixed(1)}% not background, `
    + `${Math.round(performance.now() - started)} ms.`);
}

/** The tiles or the memory budget changed: says how the model now segments, and
 * segments the photo picked again. */
async function optionsChanged() {
  if (!model) return;
  describe();
  await photoPicked();
}

/** A unet.onnx and unet.onnx.json served beside the page, if there are. */
async function servedModel() {
  const [onnx, sidecar] = await Promise.all(["unet.onnx", "unet.onnx.json"].map((url) => fetch(url)));
  if (onnx.ok && sidecar.ok) {
    await load(new Uint8Array(await onnx.arrayBuffer()), await sidecar.json(), "unet.onnx",
      "unet.onnx.json");
  }
}

const reportErrors = (step) => () => step().catch((error) => say(error.message, true));
$("model").addEventListener("change", reportErrors(modelPicked));
$("sidecar").addEventListener("change", reportErrors(modelPicked));
$("photo").addEventListener("change", reportErrors(photoPicked));
$("tiles").addEventListener("change", reportErrors(optionsChanged));
$("budget").addEventListener("change", reportErrors(optionsChanged));
$("budget").value = MEMORY_BUDGET / 2 ** 20;
reportErrors(servedModel)();
