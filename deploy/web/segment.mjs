// segment.mjs: an exported unet-jax run (ONNX) segmenting a photo in a browser or in
// Node.js, step for step as `python -m experiments.predict` does it.
//
// The steps are those the export's sidecar (<model>.onnx.json) lists under
// `prediction.how`: the picture converted to the run's colours (RGB, or Pillow's
// grayscale); for a run trained on whole images, resized to its image_size, for one
// trained on crops, resized by its scale; Pillow's bilinear filter throughout; divided
// by 255; then through the model (with --tta, also on mirrored views, their
// probabilities averaged) in one pass, mirror-padded at the bottom and right to a
// multiple of 2**depth, or, as predict --tile (and predict by itself where that pass
// would take more than a memory budget), in overlapping tiles the size of the run's
// crop (or image_size), mirror-padded all round and blended with Gaussian weights
// (unet_jax/tiling.py's tiled_logits, in float32 as JAX computes it), each tile's views
// averaged alone; the padding cut away, the logits
// resized back to the picture's size with the same filter on floats (predict itself
// uses jax.image.resize, equal to it within 1e-4), then cut at the sidecar's threshold
// (one class) or the arg-max taken (several classes). Not done here: JPEG's own
// downscaling of large photos as predict decodes them; and 16-bit files, which a
// browser decodes to 8 bits its own way.
//
// The module imports nothing: the caller passes in onnxruntime-web (`ort`), which the
// page loads from a pinned file and Node imports from node_modules. Pictures are plain
// objects {data, width, height, channels}: `data` a Uint8Array of height * width *
// channels samples, row by row, channels interleaved (1: grayscale, 3: RGB, 4: RGBA,
// as a canvas's getImageData gives them).

// The bytes a whole pass may take where the run leaves one pass or tiles to memory:
// half of the 4 GiB a WebAssembly module can address, as predict allows a pass half of
// an accelerator's memory (browsers on small devices may give less: pass a lower one).
export const MEMORY_BUDGET = 2 * 2 ** 30;

const MODES = ["resize", "whole", "tile"];

/** The sidecar's prediction settings, checked, and how to predict with them: the
 * sidecar's mode ("resize": runs trained on whole images; "whole": runs trained on
 * crops, tiled where one pass would take more than `memoryBudget` bytes; "tile"),
 * unless `tile` says otherwise as predict's --tile (true: tiles) and --no-tile (false:
 * one pass, whole or resized as the run was trained). Modes, test-time flips or tiles
 * this code does not implement would give other masks than predict, so they are
 * refused, naming the setting, with the sidecar's own `how` text, which says what
 * predict does. */
export function predictionSettings(sidecar, { tile, memoryBudget = MEMORY_BUDGET } = {}) {
  if (![undefined, true, false].includes(tile)) {
    throw new Error(`tile ${tile}: give true (tiles), false (one pass) or nothing (the `
      + "run's own way)");
  }
  if (!(memoryBudget > 0 && Number.isFinite(memoryBudget))) {
    throw new Error(`memory budget ${memoryBudget}: give a number of bytes over 0, e.g. `
      + `${MEMORY_BUDGET}`);
  }
  const given = sidecar.prediction ?? sidecar;
  const mode = tile === undefined ? given.mode : tile ? "tile" : given.crop ? "whole" : "resize";
  // Tiles where a pass would not fit, as predict decides for runs trained on crops; a
  // sidecar written before exports recorded the bytes a pass takes leaves no way to
  // weigh it: one pass, as this code took before.
  const auto = tile === undefined && mode === "whole" && sidecar.pass_bytes_per_pixel > 0;
  const tilesFit = given.tile?.length === 2 && given.overlap >= 0 && given.overlap < 1
    && given.tile.every((side) => Number.isInteger(side) && side > 0
      && side % given.size_multiple === 0);
  const problem = [
    [!MODES.includes(mode), `predicts with mode "${mode}"`],
    [!Object.hasOwn(VIEWS, given.tta), `predicts with test-time flips "${given.tta}"`],
    [![1, 3].includes(given.in_channels) || !(given.num_classes >= 1),
      `has ${given.in_channels} input channel(s) and ${given.num_classes} class(es)`],
    [(mode === "tile" || auto) && !tilesFit, `predicts in tiles of ${given.tile?.join("x")} `
      + `overlapping by ${given.overlap}, where the model takes sides that are multiples of `
      + `${given.size_multiple} and tiles overlap by a fraction in [0, 1)`],
  ].find(([wrong]) => wrong);
  if (problem) {
    throw new Error(`this code predicts with modes ${MODES.map((m) => `"${m}"`).join(", ")} and `
      + `flips "none", "hflip" and "flips"; this run ${problem[1]}, which would give other `
      + `masks than predict's. How predict segments with it: ${given.how}`);
  }
  return { ...given, mode, auto, memoryBudget,
    pass_bytes_per_pixel: sidecar.pass_bytes_per_pixel };
}

// The views --tta averages, each [mirror left-right, mirror upside down].
const VIEWS = {
  none: [[false, false]],
  hflip: [[false, false], [true, false]],
  flips: [[false, false], [true, false], [false, true], [true, true]],
};

/** The picture in the run's colours, 3 (RGB) or 1 (grayscale) channels, as Pillow's
 * convert("RGB") or convert("L") gives them: alpha dropped, grey replicated, and
 * luminance L = (R * 19595 + G * 38470 + B * 7471 + 32768) >> 16, Pillow's fixed-point
 * form of R * 299/1000 + G * 587/1000 + B * 114/1000 (equal to it, to the bit). */
export function toChannels(picture, channels) {
  const { data, width, height, channels: from } = picture;
  if (![1, 3, 4].includes(from)) throw new Error(`pictures have 1, 3 or 4 channels, not ${from}`);
  if (data.length !== width * height * from) {
    throw new Error(`${width}x${height}x${from} pixels need ${width * height * from} `
      + `samples, not ${data.length}`);
  }
  if (from === channels) return picture;
  const out = new Uint8Array(width * height * channels);
  for (let i = 0; i < width * height; i++) {
    const s = i * from;
    if (channels === 3) {  // from grey (replicated) or RGBA (alpha dropped)
      out[i * 3] = data[s];
      out[i * 3 + 1] = data[from === 1 ? s : s + 1];
      out[i * 3 + 2] = data[from === 1 ? s : s + 2];
    } else {
      out[i] = from === 1 ? data[s]
        : (data[s] * 19595 + data[s + 1] * 38470 + data[s + 2] * 7471 + 32768) >> 16;
    }
  }
  return { data: out, width, height, channels };
}

/** Pillow's bilinear weights for resizing one axis of `inSize` pixels to `outSize`:
 * for each output pixel, the first input pixel it reads and the weights of the pixels
 * from there. A triangle filter, centred on the output pixel's centre ((i + 0.5) *
 * scale, pixel centres at +0.5), whose support widens by the scale factor when
 * shrinking (so it averages every input pixel it covers: antialiasing), the weights
 * normalised to sum to 1 per output pixel; bounds rounded as Resample.c's
 * precompute_coeffs rounds them. */
function bilinearWeights(inSize, outSize) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = filterScale;  // the triangle's support, 1, widened when shrinking
  const step = 1 / filterScale;  // multiplied, as Pillow does, for the same last bits
  const taps = [];
  for (let i = 0; i < outSize; i++) {
    const centre = (i + 0.5) * scale;
    const first = Math.max(Math.trunc(centre - support + 0.5), 0);
    const end = Math.min(Math.trunc(centre + support + 0.5), inSize);
    const weights = new Float64Array(Math.max(end - first, 0));
    let sum = 0;
    for (let x = first; x < end; x++) {
      const d = Math.abs((x - centre + 0.5) * step);
      sum += weights[x - first] = d < 1 ? 1 - d : 0;
    }
    if (sum !== 0) for (let k = 0; k < weights.length; k++) weights[k] /= sum;
    taps.push({ first, weights });
  }
  return taps;
}

/** One pass of Pillow's resize along one axis, for every channel: each of `lines`
 * lines (rows or columns) is resampled with `taps` (bilinearWeights), reading sample i
 * of a line at index at(line, i) of `src` and writing output sample i at put(line, i)
 * of `dst`. With `fixedPoint` (uint8 images), Pillow's integer arithmetic: weights with
 * 22 fractional bits, the sum rounded and clipped to 0..255 after each pass; otherwise
 * (float32 images) sums in double precision, stored as float32 after each pass. */
function resamplePass(src, dst, taps, lines, channels, at, put, fixedPoint) {
  const ONE = 1 << 22;
  const fixed = fixedPoint && taps.map(({ first, weights }) => ({
    first, weights: Int32Array.from(weights, (w) => Math.trunc(w < 0 ? w * ONE - 0.5 : w * ONE + 0.5)),
  }));
  for (let line = 0; line < lines; line++) {
    for (let i = 0; i < taps.length; i++) {
      const { first, weights } = fixedPoint ? fixed[i] : taps[i];
      for (let c = 0; c < channels; c++) {
        let sum = fixedPoint ? ONE >> 1 : 0;
        for (let k = 0; k < weights.length; k++) sum += src[at(line, first + k) * channels + c] * weights[k];
        dst[put(line, i) * channels + c] = fixedPoint
          ? Math.min(Math.max(Math.floor(sum / ONE), 0), 255) : sum;
      }
    }
  }
}

/** Pillow's Image.resize((outWidth, outHeight), Image.BILINEAR) of interleaved samples
 * (uint8 for modes "L" and "RGB", each channel alone; a Float32Array for mode "F"): one
 * pass along the rows and one along the columns, each skipped where that side stays,
 * each pass's result stored in the input's type (so uint8 rounds twice). Pillow 13
 * resizes the columns first when the height shrinks by more than twice as many pixels
 * as the width does (the cheaper order; python-pillow/Pillow#9549, the rule found by
 * comparing with Pillow 13.0.0), the rows first otherwise, as older versions do in
 * every case; the two orders differ by at most 1 grey level (and float32 rounding). */
export function resize(data, width, height, channels, outWidth, outHeight) {
  const fixedPoint = data instanceof Uint8Array || data instanceof Uint8ClampedArray;
  const Type = fixedPoint ? Uint8Array : Float32Array;
  let current = data, w = width, h = height;
  const alongRows = () => {  // each row from w samples to outWidth
    const out = new Type(outWidth * h * channels);
    const from = w;
    resamplePass(current, out, bilinearWeights(w, outWidth), h, channels,
      (y, x) => y * from + x, (y, x) => y * outWidth + x, fixedPoint);
    current = out; w = outWidth;
  };
  const alongColumns = () => {  // each column from h samples to outHeight
    const out = new Type(w * outHeight * channels);
    resamplePass(current, out, bilinearWeights(h, outHeight), w, channels,
      (x, y) => y * w + x, (x, y) => y * w + x, fixedPoint);
    current = out; h = outHeight;
  };
  const columnsFirst = outHeight < height && height - outHeight > 2 * (width - outWidth);
  for (const pass of columnsFirst ? [alongColumns, alongRows] : [alongRows, alongColumns]) {
    if (pass === alongRows ? outWidth !== width : outHeight !== height) pass();
  }
  return current === data ? Type.from(data) : current;
}

/** Python's round(): halves to the even neighbour (round(2.5) is 2), as the package
 * rounds a picture's size times --scale (data_pipeline.preprocess.scaled_size). */
function roundHalfEven(x) {
  const floor = Math.floor(x);
  const diff = x - floor;
  return diff > 0.5 || (diff === 0.5 && floor % 2 !== 0) ? floor + 1 : floor;
}

/** numpy's pad mode "symmetric" for one index i of a line of n samples, i < 0 or i >= n
 * in the padding: mirrored about the border with the edge sample repeated (n, n+1, ...
 * read n-1, n-2, ...; -1, -2, ... read 0, 1, ...), periodic for pads beyond the size. */
function mirrored(i, n) {
  const j = ((i % (2 * n)) + 2 * n) % (2 * n);
  return j < n ? j : 2 * n - 1 - j;
}

/** The picture in the run's colours at the size the model sees it (the run's
 * image_size; or, for mode "whole" and "tile", its own size times the run's scale) as
 * {data, height, width, channels}: float32 values in [0, 1], uint8 / 255, the very
 * float32 numbers numpy and JAX compute. */
export function scaledImage(picture, settings) {
  const { data, width: w, height: h, channels } = toChannels(picture, settings.in_channels);
  const [height, width] = settings.mode === "resize" ? settings.image_size
    : [h, w].map((side) => Math.max(1, roundHalfEven(side * settings.scale)));
  const resized = height === h && width === w ? data
    : resize(data, w, h, channels, width, height);
  return { data: Float32Array.from(resized, (v) => v / 255), height, width, channels };
}

/** Rows top..top + height and columns left..left + width of an image {data, height,
 * width, channels} as a Float32Array, mirrored (mirrored()) where they reach beyond it:
 * a whole pass's input padded at the bottom and right, one tile of the image padded
 * all round, or (within the image) logits with the padding cut away. */
function cut(image, top, left, height, width) {
  const { data, channels } = image;
  const out = new Float32Array(height * width * channels);
  for (let y = 0; y < height; y++) {
    const row = mirrored(top + y, image.height) * image.width;
    for (let x = 0; x < width; x++) {
      const from = (row + mirrored(left + x, image.width)) * channels;
      out.set(data.subarray(from, from + channels), (y * width + x) * channels);
    }
  }
  return out;
}

/** The size one pass over a scaledImage runs at: its own, for a run trained on crops
 * rounded up to a multiple of size_multiple (2**depth), the rest mirrored at the bottom
 * and right. */
function passSize(image, settings) {
  const multiple = settings.mode === "resize" ? 1 : settings.size_multiple;
  return [image.height, image.width].map((side) => Math.ceil(side / multiple) * multiple);
}

/** The model's input for one pass over the picture, (1, H, W, C) {data, dims}, with
 * {height, width}: the part of it that is the picture. */
export function modelInput(picture, settings) {
  const image = scaledImage(picture, settings);
  const [h, w] = passSize(image, settings);
  return { data: cut(image, 0, 0, h, w), dims: [1, h, w, image.channels], height: image.height,
    width: image.width };
}

/** Mirrors (1, H, W, C) float32 values left-right and/or upside down: a view for --tta,
 * and the way back for its logits. */
function flipped(data, [, h, w, c], [leftRight, upsideDown]) {
  if (!leftRight && !upsideDown) return data;
  const out = new Float32Array(data.length);
  for (let y = 0; y < h; y++) {
    const fy = upsideDown ? h - 1 - y : y;
    for (let x = 0; x < w; x++) {
      const fx = leftRight ? w - 1 - x : x;
      out.set(data.subarray((fy * w + fx) * c, (fy * w + fx + 1) * c), (y * w + x) * c);
    }
  }
  return out;
}

/** The logits of each view averaged as predict averages them (unet_jax.tiling's
 * flip_average), in float32 as JAX computes them (Math.fround after each step): each
 * view's logits turned into probabilities (sigmoid of one logit, softmax of several),
 * averaged, clipped to [1e-7, 1 - 1e-7] as float32 numbers and turned back into
 * logits, log(p / (1 - p)) for one class or log p for several. In float64 a confident
 * pixel's logit came back as 16.12 where JAX's is 15.94, which moves the edge between
 * sure foreground and sure background once the logits are resized. */
function averagedLogits(viewLogits, classes) {
  if (viewLogits.length === 1) return viewLogits[0];
  const f = Math.fround;
  const [low, high] = [f(1e-7), f(1 - 1e-7)];
  const pixels = viewLogits[0].length / classes;
  const out = new Float32Array(viewLogits[0].length);
  const probs = new Float32Array(classes);
  for (let i = 0; i < pixels; i++) {
    probs.fill(0);
    for (const logits of viewLogits) {
      if (classes === 1) {
        probs[0] += f(1 / (1 + Math.exp(-logits[i])));
      } else {
        let top = -Infinity, sum = 0;
        for (let k = 0; k < classes; k++) top = Math.max(top, logits[i * classes + k]);
        for (let k = 0; k < classes; k++) sum = f(sum + f(Math.exp(logits[i * classes + k] - top)));
        for (let k = 0; k < classes; k++) {
          probs[k] += f(f(Math.exp(logits[i * classes + k] - top)) / sum);
        }
      }
    }
    for (let k = 0; k < classes; k++) {
      const p = Math.min(Math.max(f(probs[k] / viewLogits.length), low), high);
      out[i * classes + k] = classes === 1 ? f(f(Math.log(p)) - f(Math.log1p(-p))) : Math.log(p);
    }
  }
  return out;
}

/** The mask at the picture's own size from the model's logits (1, h, w, K): each
 * class's logits resized back bilinearly as float32 (Pillow's mode "F", as predict
 * resizes logits before deciding, for smooth edges), then 255 where the one class's
 * logit is over the threshold (compared in float32, as JAX and numpy compare), or the
 * class id of the largest logit (the first, on ties) for several classes: the values
 * predict writes to its PNG masks. */
export function maskFromLogits(logits, dims, settings, width, height) {
  const [, h, w, classes] = dims;
  const planes = [];
  for (let k = 0; k < classes; k++) {
    const plane = new Float32Array(h * w);
    for (let i = 0; i < h * w; i++) plane[i] = logits[i * classes + k];
    planes.push(resize(plane, w, h, 1, width, height));
  }
  const mask = new Uint8Array(width * height);
  if (classes === 1) {
    const threshold = Math.fround(settings.threshold);
    for (let i = 0; i < mask.length; i++) mask[i] = planes[0][i] > threshold ? 255 : 0;
  } else {
    for (let i = 0; i < mask.length; i++) {
      let best = 0;
      for (let k = 1; k < classes; k++) if (planes[k][i] > planes[best][i]) best = k;
      mask[i] = best;
    }
  }
  return mask;
}

/** Throws unless `sidecar` (the parsed settings file, named `sidecarName`) is the one
 * export wrote with the ONNX model `modelBytes` (named `modelName`): an ONNX export's,
 * whose recorded SHA-256 is the model's (or its size, where the page is served over
 * plain http from another machine: browsers give `crypto.subtle` to secure origins
 * alone). A model beside another run's settings had been segmented by the wrong
 * rules, or failed inside onnxruntime. */
export async function checkExport(sidecar, sidecarName, modelBytes, modelName) {
  if (sidecar === null || typeof sidecar !== "object" || !sidecar.prediction) {
    throw new Error(`${sidecarName} is not an export's settings file: give the `
      + "MODEL.onnx.json that experiments.export wrote beside MODEL.onnx");
  }
  if (sidecar.format !== undefined && sidecar.format !== "onnx") {
    throw new Error(`${sidecarName} is the settings file of a ${sidecar.format} export, not `
      + `of ${modelName}: give the .onnx.json written beside it`);
  }
  const other = `${sidecarName} describes another model than ${modelName}`;
  if (sidecar.sha256 && globalThis.crypto?.subtle) {
    const digest = await globalThis.crypto.subtle.digest("SHA-256", modelBytes);
    const hex = Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
    if (hex !== sidecar.sha256) {
      throw new Error(`${other} (its SHA-256 differs): give the model and the settings `
        + "file of one export");
    }
  } else if (sidecar.bytes !== undefined && modelBytes.byteLength !== sidecar.bytes) {
    throw new Error(`${other} (its size differs): give the model and the settings file of `
      + "one export");
  }
}

/** An onnxruntime-web session of the exported model (an ArrayBuffer/Uint8Array of the
 * .onnx file, or its URL), on the WebAssembly CPU backend: the one that runs alike in
 * every browser and in Node. A file onnxruntime cannot load is named (`name`). */
export async function createSession(ort, model, name = "the model") {
  try {
    return await ort.InferenceSession.create(model, { executionProviders: ["wasm"] });
  } catch (error) {
    throw new Error(`${name} is not an ONNX model onnxruntime can load (${error.message}); `
      + "give the .onnx file experiments.export wrote");
  }
}

// --- Tiles: unet_jax/tiling.py's tiled_logits, which predict runs ---------------------

/** tiling.tile_starts: where tiles of `tile` start along `length` (at least `tile`),
 * neighbours sharing at least a fraction `overlap`, spread evenly from 0 to the end
 * (Python's rounding of each start). */
function tileStarts(length, tile, overlap) {
  if (length === tile) return [0];
  const stride = Math.max(1, Math.floor(tile * (1 - overlap)));
  const count = Math.ceil((length - tile) / stride) + 1;
  return Array.from({ length: count },
    (_, i) => roundHalfEven(i * (length - tile) / (count - 1)));
}

/** tiling.padding along one side: [before, after], a margin of half the overlap (none
 * where one tile fits exactly), more after where the side is shorter than a tile. */
function tilePadding(length, tile, overlap) {
  const margin = length === tile ? 0 : roundHalfEven(tile * overlap / 2);
  return [margin, margin + Math.max(0, tile - (length + 2 * margin))];
}

/** One axis of tiling.gaussian_weights, in float64: a Gaussian centred on a tile's
 * side of `size`, sigma size / 8, 1 at the centre. */
function gaussian(size) {
  return Float64Array.from({ length: size }, (_, i) => {
    const r = (i - (size - 1) / 2) / (size * (1 / 8));
    return Math.exp(-0.5 * (r * r));
  });
}

/** Logits (h, w, K) of a scaledImage in tiles, as predict computes them: the image
 * mirror-padded all round (tilePadding), tiles of settings.tile at tileStarts, each
 * through `model` (its views averaged), added tile after tile (rows first) into float32
 * sums weighted by the Gaussian (the outer product of both axes' in float64, stored as
 * float32), divided by the weights' sums (each axis's in float64, stored as float32,
 * their product in float32) and the padding cut away. A padded image that is one tile
 * gives that tile's logits, unweighted. */
async function tiledLogits(model, image, { tile, overlap }) {
  const f = Math.fround;
  const [th, tw] = tile;
  const sides = [image.height, image.width];
  const pads = sides.map((side, a) => tilePadding(side, tile[a], overlap));
  const [top, left] = [pads[0][0], pads[1][0]];
  const [height, width] = sides.map((side, a) => side + pads[a][0] + pads[a][1]);
  const [ys, xs] = [height, width].map((side, a) => tileStarts(side, tile[a], overlap));
  const logitsAt = (y, x) => model(cut(image, y - top, x - left, th, tw),
    [1, th, tw, image.channels]);
  if (ys.length === 1 && xs.length === 1) {
    const { logits, classes } = await logitsAt(0, 0);
    return { logits: cut({ data: logits, height: th, width: tw, channels: classes }, top, left,
      image.height, image.width), classes };
  }
  const [rowWeights, columnWeights] = tile.map(gaussian);
  let total, classes;
  for (const y of ys) {
    for (const x of xs) {
      const tileLogits = await logitsAt(y, x);
      classes = tileLogits.classes;
      total ??= new Float32Array(height * width * classes);
      for (let i = 0; i < th; i++) {
        for (let j = 0; j < tw; j++) {
          const weight = f(rowWeights[i] * columnWeights[j]);
          const from = (i * tw + j) * classes, to = ((y + i) * width + x + j) * classes;
          for (let k = 0; k < classes; k++) {
            total[to + k] += f(tileLogits.logits[from + k] * weight);  // stored as float32
          }
        }
      }
    }
  }
  const [rowSums, columnSums] = [[height, ys, rowWeights], [width, xs, columnWeights]].map(
    ([side, starts, weights]) => {
      const sums = new Float64Array(side);
      for (const start of starts) weights.forEach((w, i) => { sums[start + i] += f(w); });
      return Float32Array.from(sums);
    });
  const logits = new Float32Array(image.height * image.width * classes);
  for (let y = 0; y < image.height; y++) {
    for (let x = 0; x < image.width; x++) {
      const sum = f(rowSums[y + top] * columnSums[x + left]);
      const from = ((y + top) * width + x + left) * classes, to = (y * image.width + x) * classes;
      for (let k = 0; k < classes; k++) logits[to + k] = total[from + k] / sum;
    }
  }
  return { logits, classes };
}

/** How predict takes an image (a scaledImage): in tiles where the settings leave it to
 * memory and one pass would take more than their memory budget, a pass taking
 * pass_bytes_per_pixel bytes per pixel of its padded size (unet_jax/prediction.py's
 * PredictionMode.how_for and pass_bytes); otherwise the settings' mode. */
function howFor(settings, image) {
  if (!settings.auto) return settings.mode;
  const [h, w] = passSize(image, settings);
  return h * w * settings.pass_bytes_per_pixel > settings.memoryBudget ? "tile" : "whole";
}

/** Logits (h, w, K) of a scaledImage in one pass (passSize), the padding cut away. */
async function passLogits(model, image, settings) {
  const [h, w] = passSize(image, settings);
  const { logits, classes } = await model(cut(image, 0, 0, h, w), [1, h, w, image.channels]);
  return { logits: cut({ data: logits, height: h, width: w, channels: classes }, 0, 0,
    image.height, image.width), classes };
}

/** The mask of one picture: {mask, width, height, how}, a Uint8Array of height * width
 * at the picture's own size (0/255 for one class, class ids for several), computed as
 * `experiments.predict` computes it, and how: "resize", "whole" or "tile". `sidecar` is
 * the export's <model>.onnx.json; `options` {tile, memoryBudget} as predictionSettings
 * takes them. */
export async function segment(ort, session, sidecar, picture, options = {}) {
  const settings = predictionSettings(sidecar, options);
  const input = sidecar.input?.name ?? "image";
  const output = sidecar.output?.name ?? session.outputNames[0];
  /** The logits (h, w, K) of one input (1, h, w, C), averaged over the run's views. */
  const model = async (data, dims) => {
    const viewLogits = [];
    let classes;
    for (const view of VIEWS[settings.tta]) {
      const outputs = await session.run({
        [input]: new ort.Tensor("float32", flipped(data, dims, view), dims) });
      const logits = outputs[output];
      classes = logits.dims[3];
      viewLogits.push(flipped(logits.data, logits.dims, view));
    }
    return { logits: averagedLogits(viewLogits, classes), classes };
  };
  const image = scaledImage(picture, settings);
  const how = howFor(settings, image);
  const { logits, classes } = await (how === "tile" ? tiledLogits : passLogits)(
    model, image, settings);
  const mask = maskFromLogits(logits, [1, image.height, image.width, classes], settings,
    picture.width, picture.height);
  return { mask, width: picture.width, height: picture.height, how };
}
