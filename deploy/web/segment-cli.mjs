#!/usr/bin/env node
// segment-cli.mjs: segment.mjs from the command line, under Node.js with onnxruntime-web's
// WebAssembly backend: the page's own code, run where a test (tests/test_web.py) can
// compare its masks with `python -m experiments.predict`'s.
//
//   node segment-cli.mjs segment [--tile | --no-tile] [--memory-budget SIZE]
//        unet.onnx unet.onnx.json photo.raw mask.raw [more.raw more_mask.raw ...]
//   node segment-cli.mjs resize in.raw WIDTH HEIGHT out.raw      (Pillow's bilinear resize, uint8)
//   node segment-cli.mjs resize-float in.raw WIDTH HEIGHT out.raw (the same on float32: mode "F")
//   node segment-cli.mjs gray in.raw out.raw                     (Pillow's convert("L"))
//   node segment-cli.mjs model-input unet.onnx.json photo.raw x.raw (the model's input, float32)
//
// Node has no image decoder, so pictures travel as raw files: a 12-byte header of three
// unsigned 32-bit little-endian integers, width, height and channels (1 grayscale, 3 RGB,
// 4 RGBA), then height * width * channels samples, row by row from the top, channels
// interleaved: uint8 bytes, or float32 little-endian for resize-float. Masks are written
// in the same format with 1 channel (0/255 for one class, class ids for several);
// `segment` also prints one JSON line per picture, with how it was predicted ("resize",
// "whole" or "tile"). Its --tile and --no-tile are predict's: tiles, or one pass (whole,
// or resized for a run trained on whole images); without them, the run's own way, where
// a run trained on crops is tiled if one pass would take more than --memory-budget
// (bytes, or with KiB, MiB or GiB; default 2GiB, WebAssembly's 4 GiB halved). Errors
// (a sidecar this code does not implement: its `how` text) go to stderr, exit status 2.

import { readFileSync, writeFileSync } from "node:fs";
import * as ort from "onnxruntime-web";
import {
  checkExport, createSession, modelInput, predictionSettings, resize, segment, toChannels,
} from "./segment.mjs";

/** The bytes of `path`; a file that is not there is named with `what` should be there. */
function readable(path, what) {
  try {
    return readFileSync(path);
  } catch (error) {
    const named = new Error(`${path}: ${error.code === "ENOENT" ? "no such file" : error.message}; `
      + `give ${what}`);
    named.readable = true;
    throw named;
  }
}

/** A raw file as {data, width, height, channels} (Float32Array samples with `float`). */
function readRaw(path, float = false) {
  const bytes = readable(path, "a raw picture (see this file's top)");
  const [width, height, channels] = [0, 4, 8].map((at) => bytes.readUInt32LE(at));
  const body = bytes.subarray(12);
  const count = width * height * channels;
  if (![1, 3, 4].includes(channels) || body.length !== count * (float ? 4 : 1)) {
    throw new Error(`${path} is not a raw picture of this format (a 12-byte header of `
      + "width, height and 1, 3 or 4 channels, then the samples; see this file's top): "
      + "convert the image first, e.g. with Pillow as tests/test_web.py's write_raw does");
  }
  const data = float ? new Float32Array(count) : new Uint8Array(body);
  if (float) for (let i = 0; i < count; i++) data[i] = body.readFloatLE(i * 4);
  return { data, width, height, channels };
}

/** Writes {data, width, height, channels} as a raw file (float32 for a Float32Array). */
function writeRaw(path, { data, width, height, channels }) {
  const header = Buffer.alloc(12);
  [width, height, channels].forEach((n, i) => header.writeUInt32LE(n, i * 4));
  const body = data instanceof Float32Array ? Buffer.alloc(data.length * 4) : Buffer.from(data);
  if (data instanceof Float32Array) data.forEach((v, i) => body.writeFloatLE(v, i * 4));
  writeFileSync(path, Buffer.concat([header, body]));
}

/** --memory-budget's value in bytes: a number, or one with KiB, MiB or GiB after it. */
function bytes(text) {
  const [, number, unit] = /^(\d+(?:\.\d+)?)\s*(KiB|MiB|GiB)?$/.exec(text ?? "") ?? [];
  if (number === undefined || !(Number(number) > 0)) {
    throw new Error(`--memory-budget ${text ?? "(nothing)"}: give bytes, e.g. 2GiB, 512MiB `
      + "or 1000000");
  }
  return Number(number) * 2 ** (10 * ["", "KiB", "MiB", "GiB"].indexOf(unit ?? ""));
}

/** segment's options (--tile, --no-tile, --memory-budget SIZE) taken out of its
 * arguments: [options for segment(), the rest]. */
function segmentOptions(args) {
  const options = {}, rest = [];
  for (let i = 0; i < args.length; i++) {
    if (args[i] === "--tile" || args[i] === "--no-tile") options.tile = args[i] === "--tile";
    else if (args[i] === "--memory-budget") options.memoryBudget = bytes(args[++i]);
    else rest.push(args[i]);
  }
  return [options, rest];
}

/** The command: segment, resize, resize-float or gray, as the header says. */
async function main([command, ...given]) {
  const [options, args] = command === "segment" ? segmentOptions(given) : [{}, given];
  if (command === "segment" && args.length >= 4 && args.length % 2 === 0) {
    const [model, sidecarPath, ...pairs] = args;
    let sidecar;
    try {
      sidecar = JSON.parse(readable(sidecarPath, "the MODEL.onnx.json export wrote").toString("utf8"));
    } catch (error) {
      if (error.readable) throw error;
      throw new Error(`${sidecarPath} is not the export's JSON settings file (${error.message}); `
        + "give MODEL.onnx first, then the MODEL.onnx.json export wrote beside it");
    }
    const modelBytes = readable(model, "MODEL.onnx, the model experiments.export wrote");
    await checkExport(sidecar, sidecarPath, modelBytes, model);
    predictionSettings(sidecar, options);  // a run this code does not implement stops here
    ort.env.wasm.numThreads = 1;  // one thread: quiet on small machines, and the same sums
    const session = await createSession(ort, modelBytes, model);
    for (let i = 0; i < pairs.length; i += 2) {
      const { mask, width, height, how } = await segment(ort, session, sidecar, readRaw(pairs[i]),
        options);
      writeRaw(pairs[i + 1], { data: mask, width, height, channels: 1 });
      const foreground = mask.reduce((n, v) => n + (v > 0), 0) / mask.length;
      console.log(JSON.stringify({ input: pairs[i], mask: pairs[i + 1], width, height, how,
        foreground }));
    }
  } else if (command === "model-input" && args.length === 3) {
    const settings = predictionSettings(JSON.parse(readFileSync(args[0], "utf8")));
    const x = modelInput(readRaw(args[1]), settings);
    writeRaw(args[2], { data: x.data, width: x.dims[2], height: x.dims[1], channels: x.dims[3] });
  } else if ((command === "resize" || command === "resize-float") && args.length === 4) {
    const picture = readRaw(args[0], command === "resize-float");
    const [width, height] = [Number(args[1]), Number(args[2])];
    const data = resize(picture.data, picture.width, picture.height, picture.channels, width, height);
    writeRaw(args[3], { data, width, height, channels: picture.channels });
  } else if (command === "gray" && args.length === 2) {
    writeRaw(args[1], toChannels(readRaw(args[0]), 1));
  } else {
    throw new Error("usage: segment-cli.mjs segment [--tile | --no-tile] [--memory-budget SIZE] "
      + "MODEL.onnx SIDECAR.json IN.raw OUT.raw [IN OUT ...] "
      + "| resize IN.raw WIDTH HEIGHT OUT.raw | resize-float IN.raw WIDTH HEIGHT OUT.raw "
      + "| gray IN.raw OUT.raw | model-input SIDECAR.json IN.raw OUT.raw");
  }
}

main(process.argv.slice(2)).catch((error) => {
  console.error(error.message);
  process.exit(2);
});
