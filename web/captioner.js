// Caption an image in the browser with a folder written by `clipcap export-onnx`, on onnxruntime-web: CLIP's
// preprocessing on a canvas, greedy decoding with the merged decoder's key/value cache, and the tokenizer's
// byte-level BPE decoding read from tokenizer.json (all a caption needs, so no tokenizer library is loaded).

async function fetchJson(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

// GPT-2's byte-level alphabet: byte b is written as the character bytesToUnicode[b] in the vocabulary.
function unicodeToByte() {
  const printable = [];
  for (let b = 33; b <= 126; b++) printable.push(b);
  for (let b = 161; b <= 172; b++) printable.push(b);
  for (let b = 174; b <= 255; b++) printable.push(b);
  const table = new Map(printable.map((b) => [String.fromCharCode(b), b]));
  let shifted = 0;
  for (let b = 0; b < 256; b++) {
    if (!printable.includes(b)) table.set(String.fromCharCode(256 + shifted++), b);
  }
  return table;
}

// An ONNX model's metadata_props (ModelProto field 14, entries of key 1 and value 2), read from the file's top-level
// protobuf fields: onnxruntime-web does not expose a model's metadata. The graph (field 7) is skipped, not parsed.
function onnxMetadata(bytes) {
  let pos = 0;
  const varint = () => {
    let value = 0;
    let scale = 1;
    let byte;
    do {
      byte = bytes[pos++];
      value += (byte & 0x7f) * scale;
      scale *= 128;
    } while (byte & 0x80);
    return value;
  };
  const text = (length) => new TextDecoder().decode(bytes.subarray(pos, (pos += length)));
  const metadata = {};
  while (pos < bytes.length) {
    const tag = varint();
    const wireType = tag % 8;
    if (wireType === 0) varint();
    else if (wireType === 1) pos += 8;
    else if (wireType === 5) pos += 4;
    else if (wireType !== 2) throw new Error(`not an ONNX model (protobuf wire type ${wireType})`);
    else if (Math.floor(tag / 8) !== 14) {
      const length = varint(); // read first: `pos += varint()` would add to the position before the length
      pos += length;
    } else {
      const end = varint() + pos;
      const entry = {};
      while (pos < end) {
        const field = Math.floor(varint() / 8);
        entry[field] = text(varint());
      }
      metadata[entry[1]] = entry[2];
    }
  }
  return metadata;
}

// Python's round(), which rounds halves to even, as the image processor's crop offsets do.
function roundHalfEven(x) {
  const rounded = Math.round(x);
  return Math.abs(x % 1) === 0.5 && rounded % 2 !== 0 ? rounded - 1 : rounded;
}

// The decoder's metadata entry for its learned position table's size ("none": rotary or ALiBi positions).
const POSITION_LIMIT_KEY = "clipcap.learned_position_limit";
// ClipCap's caption length when a generation config chooses none (modeling_clipcap.DEFAULT_MAX_NEW_TOKENS).
const DEFAULT_MAX_NEW_TOKENS = 30;

// `generate()`'s caption length, as Python's OnnxCaptioner reads the generation config: max_new_tokens, else
// max_length less the image tokens (neither: DEFAULT_MAX_NEW_TOKENS; a saved config holds no default value), cut
// with a warning to the positions a learned position table has left after the image tokens.
function captionLength(generation, prefixLength, positionLimit) {
  let length = generation.max_new_tokens;
  if (length == null) {
    length = generation.max_length == null ? DEFAULT_MAX_NEW_TOKENS : generation.max_length - prefixLength;
  }
  if (positionLimit !== null && prefixLength + length > positionLimit) {
    const room = positionLimit - prefixLength;
    console.warn(`The generation config asks for ${length} new tokens, but the language model has room for ${room} `
      + `after the ${prefixLength} image tokens (max_position_embeddings=${positionLimit}): generating at most ${room}.`);
    length = room;
  }
  return length;
}

// An exported folder's URL (relative to the page, or absolute), as the base its files resolve against: with the path's
// trailing "/" added where it lacks one, since `new URL("config.json", ".../resolve/main")` drops the last segment
// (".../resolve/config.json"). Added to the path, so before any query string.
function folderBase(folderUrl) {
  const base = new URL(folderUrl, location.href);
  if (!base.pathname.endsWith("/")) base.pathname += "/";
  return base;
}

export class ClipCapCaptioner {
  // `folderUrl`: the exported folder, with or without a trailing "/".
  static async load(ort, folderUrl, quantized = false) {
    const base = folderBase(folderUrl);
    const files = ["config.json", "generation_config.json", "tokenizer.json"];
    const [config, generation, tokenizer] = await Promise.all(files.map((f) => fetchJson(new URL(f, base))));
    const tokenizerConfig = await fetchJson(new URL("tokenizer_config.json", base)).catch(() => ({}));
    if (tokenizer.decoder?.type !== "ByteLevel") {
      throw new Error(`tokenizer.json: the page decodes byte-level BPE (GPT-2-style) tokenizers only, not a `
        + `${tokenizer.decoder?.type ?? "missing"} decoder; caption this model in Python (OnnxCaptioner).`);
    }
    // transformers 5 nests the image processor's settings in processor_config.json; 4.x writes them apart.
    const processor = await fetchJson(new URL("processor_config.json", base)).catch(() => ({}));
    const imageConfig = processor.image_processor ?? (await fetchJson(new URL("preprocessor_config.json", base)));
    ort.env.wasm.numThreads = 1; // threads need a cross-origin-isolated page
    ort.env.wasm.wasmPaths = new URL("node_modules/onnxruntime-web/dist/", import.meta.url).href;
    const suffix = quantized ? "_quantized" : "";
    const graphUrl = (name) => new URL(`onnx/${name}${suffix}.onnx`, base);
    // The decoder's bytes are fetched here, to read its metadata (the position limit) as well.
    const decoderResponse = await fetch(graphUrl("decoder_model_merged"));
    if (!decoderResponse.ok) throw new Error(`${graphUrl("decoder_model_merged")}: HTTP ${decoderResponse.status}`);
    const decoderBytes = new Uint8Array(await decoderResponse.arrayBuffer());
    const limit = onnxMetadata(decoderBytes)[POSITION_LIMIT_KEY];
    const [vision, embed, decoder] = await Promise.all([
      ort.InferenceSession.create(graphUrl("vision_encoder").href),
      ort.InferenceSession.create(graphUrl("embed_tokens").href),
      ort.InferenceSession.create(decoderBytes),
    ]);
    const positionLimit = limit === undefined || limit === "none" ? null : Number(limit);
    return new ClipCapCaptioner(
      ort, config, generation, imageConfig, tokenizer, tokenizerConfig, { vision, embed, decoder }, positionLimit);
  }

  constructor(ort, config, generation, imageConfig, tokenizer, tokenizerConfig, sessions, positionLimit = null) {
    Object.assign(this, { ort, config, generation, imageConfig, sessions });
    const eos = generation.eos_token_id;
    this.eos = new Set(Array.isArray(eos) ? eos : eos == null ? [] : [eos]);
    this.cleanUpSpaces = tokenizerConfig.clean_up_tokenization_spaces === true;
    this.maxNewTokens = captionLength(generation, config.prefix_length, positionLimit);
    this.tokens = new Map(Object.entries(tokenizer.model.vocab).map(([token, id]) => [id, token]));
    this.special = new Set(tokenizer.added_tokens.filter((t) => t.special).map((t) => t.id));
    // Added tokens are stored as their text, not in the byte-level alphabet.
    this.added = new Map(tokenizer.added_tokens.map((t) => [t.id, t.content]));
    this.byteOf = unicodeToByte();
    this.pastNames = sessions.decoder.inputNames.filter((name) => name.startsWith("past_key_values."));
    const text = config.text_config;
    this.kvHeads = text.num_key_value_heads ?? text.num_attention_heads ?? text.n_head;
    this.headDim = text.head_dim ?? (text.hidden_size ?? text.n_embd) / (text.num_attention_heads ?? text.n_head);
  }

  // The image processor's steps: the short side to `size` (both sides with resize_mode "squash"), the centre
  // `crop_size` square, then (pixel / 255 - mean) / std, channels first. The canvas's smooth resampling is not PIL's
  // bicubic, so a resized image's pixels differ slightly from Python's; an image already at the crop size does not.
  pixelValues(image) {
    const { size, image_mean: mean, image_std: std } = this.imageConfig;
    const crop = this.imageConfig.crop_size ?? size;
    const [width, height] = [image.naturalWidth, image.naturalHeight];
    let [resizedWidth, resizedHeight] = [size, size];
    if (this.imageConfig.resize_mode !== "squash") {
      if (width <= height) resizedHeight = Math.floor((size * height) / width);
      else resizedWidth = Math.floor((size * width) / height);
    }
    const left = roundHalfEven((resizedWidth - crop) / 2);
    const top = roundHalfEven((resizedHeight - crop) / 2);
    const canvas = new OffscreenCanvas(crop, crop);
    const context = canvas.getContext("2d");
    context.fillStyle = "white"; // transparent pixels are composited on white, as the processor does
    context.fillRect(0, 0, crop, crop);
    context.imageSmoothingQuality = "high";
    context.drawImage(image, -left, -top, resizedWidth, resizedHeight);
    const rgba = context.getImageData(0, 0, crop, crop).data;
    const pixels = new Float32Array(3 * crop * crop);
    for (let i = 0; i < crop * crop; i++) {
      for (let c = 0; c < 3; c++) pixels[c * crop * crop + i] = (rgba[4 * i + c] / 255 - mean[c]) / std[c];
    }
    return new this.ort.Tensor("float32", pixels, [1, 3, crop, crop]);
  }

  async decode(inputsEmbeds, past, pastLength) {
    const newLength = inputsEmbeds.dims[1];
    const total = pastLength + newLength;
    const feeds = {
      inputs_embeds: inputsEmbeds,
      attention_mask: new this.ort.Tensor("int64", new BigInt64Array(total).fill(1n), [1, total]),
      position_ids: new this.ort.Tensor(
        "int64", BigInt64Array.from({ length: newLength }, (_, i) => BigInt(pastLength + i)), [1, newLength]),
    };
    this.pastNames.forEach((name, i) => { feeds[name] = past[i]; });
    const outputs = await this.sessions.decoder.run(feeds);
    const present = this.pastNames.map((name) => outputs[name.replace("past_key_values", "present")]);
    return { logits: outputs.logits, past: present, length: total };
  }

  // Greedy decoding, as `generate()` does it with the exported generation config: suppressed tokens never win, and
  // the caption ends at an EOS token or after max_new_tokens.
  async generate(image) {
    const { prefix_embeds: prefix } = await this.sessions.vision.run({ pixel_values: this.pixelValues(image) });
    // The first step reads the prefix with an empty cache (past length 0), as the merged decoder expects.
    const emptyPast = () => new this.ort.Tensor("float32", new Float32Array(0), [1, this.kvHeads, 0, this.headDim]);
    let step = await this.decode(prefix, this.pastNames.map(emptyPast), 0);
    // As `generate()`: the image token too, whatever the generation config's list says (one can lack it).
    const suppressed = new Set([...(this.generation.suppress_tokens ?? []), this.config.image_token_id]);
    const tokens = [];
    for (let i = 0; i < this.maxNewTokens; i++) {
      const [, length, vocab] = step.logits.dims;
      const last = step.logits.data.subarray((length - 1) * vocab, length * vocab);
      let best = -1;
      for (let id = 0; id < vocab; id++) {
        if (!suppressed.has(id) && (best < 0 || last[id] > last[best])) best = id;
      }
      tokens.push(best);
      if (this.eos.has(best)) break;
      const ids = new this.ort.Tensor("int64", BigInt64Array.from([BigInt(best)]), [1, 1]);
      const { inputs_embeds: embeds } = await this.sessions.embed.run({ input_ids: ids });
      step = await this.decode(embeds, step.past, step.length);
    }
    return tokens;
  }

  // Tokens to text: special tokens skipped, byte-level symbols turned back into UTF-8 bytes, and, where the tokenizer
  // config asks for it, transformers' clean-up of spaces before punctuation and English contractions.
  detokenize(tokens) {
    const bytes = [];
    for (const id of tokens) {
      if (this.special.has(id)) continue;
      if (this.added.has(id)) bytes.push(...new TextEncoder().encode(this.added.get(id)));
      else for (const symbol of this.tokens.get(id) ?? "") bytes.push(this.byteOf.get(symbol));
    }
    let text = new TextDecoder().decode(new Uint8Array(bytes));
    if (this.cleanUpSpaces) {
      for (const tail of [".", "?", "!", ",", "' ", "n't", "'m", "'s", "'ve", "'re"]) {
        text = text.replaceAll(` ${tail}`, tail === "' " ? "'" : tail);
      }
    }
    return text.trim();
  }
}
