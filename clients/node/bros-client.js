'use strict';
/**
 * A small Node.js client for bros.v1.Inference.
 *
 * The stubs are built at run time from the repository's .proto files with
 * @grpc/proto-loader (nothing is generated or copied): field names are lowerCamelCase
 * (serviceClass, maxTokens), enums are their names ("REALTIME"), 64-bit integers are
 * Numbers (token indices stay far below 2^53).
 *
 *   const { BrosClient } = require('./bros-client');
 *   const client = new BrosClient('127.0.0.1:50051');
 *   for await (const event of client.generate({ text: 'Hello', serviceClass: 'rt', maxTokens: 16 })) {
 *     if (event.type === 'chunk') process.stdout.write(event.text);
 *     else console.log('\n', event.finishReason, event.ttftMs);
 *   }
 *   client.close();
 */
const path = require('node:path');
const { randomUUID } = require('node:crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// proto/ at the repository root; BROS_PROTO_DIR points elsewhere (e.g. a copy in an image).
const DEFAULT_PROTO_DIR = process.env.BROS_PROTO_DIR || path.resolve(__dirname, '..', '..', 'proto');

const CLASSES = { rt: 'REALTIME', be: 'BEST_EFFORT', REALTIME: 'REALTIME', BEST_EFFORT: 'BEST_EFFORT' };

/** The bros.v1 package (service constructors and message types) from the .proto files. */
function loadBrosPackage(protoDir = DEFAULT_PROTO_DIR) {
  const definition = protoLoader.loadSync('bros/v1/inference.proto', {
    includeDirs: [protoDir],
    keepCase: false,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).bros.v1;
}

/**
 * Channel credentials: plaintext by default; TLS with `rootCerts` (PEM Buffer of the CA),
 * mTLS when `privateKey` and `certChain` are given as well.
 */
function channelCredentials({ rootCerts, privateKey, certChain } = {}) {
  if (!rootCerts && !privateKey) return grpc.credentials.createInsecure();
  return grpc.credentials.createSsl(rootCerts || null, privateKey || null, certChain || null);
}

/**
 * The GenerateRequest message for `options`:
 *   exactly one prompt: text (string), tokenIds (array of ints) or chat ([{role, content}]);
 *   serviceClass: 'rt' | 'be' (or the enum names); ttftMs, tpotMs (RT targets, 0 = default);
 *   sampling: maxTokens (required), temperature, topP, topK, seed, stop, stopTokenIds, ignoreEos;
 *   requestId (default: a fresh one, so the call can be resumed or aborted), resumeFromIndex
 *   (reattach to a running request).
 */
function generateRequest(options) {
  const prompts = ['text', 'tokenIds', 'chat'].filter((k) => options[k] !== undefined);
  if (prompts.length !== 1) throw new TypeError(`exactly one of text, tokenIds, chat is required, got ${prompts.length}`);
  const serviceClass = CLASSES[options.serviceClass];
  if (!serviceClass) throw new TypeError(`serviceClass must be 'rt' or 'be', got ${options.serviceClass}`);
  const request = { serviceClass, ttftMs: options.ttftMs || 0, tpotMs: options.tpotMs || 0 };
  if (options.text !== undefined) request.text = options.text;
  if (options.tokenIds !== undefined) request.tokenIds = { ids: options.tokenIds };
  if (options.chat !== undefined) request.chat = { messages: options.chat };
  const sampling = { maxTokens: options.maxTokens };
  for (const key of ['temperature', 'topP', 'topK', 'seed', 'stop', 'stopTokenIds', 'ignoreEos']) {
    if (options[key] !== undefined) sampling[key] = options[key];
  }
  request.sampling = sampling;
  request.requestId = options.requestId || randomUUID();
  if (options.resumeFromIndex !== undefined) request.resumeFromIndex = options.resumeFromIndex;
  return request;
}

/** A GenerateResponse as a plain event: {type: 'chunk', ...} or {type: 'final', ...}. */
function toEvent(message) {
  if (message.kind === 'chunk') {
    const { index, tokenIds, text } = message.chunk;
    return { type: 'chunk', requestId: message.requestId, index, tokenIds, text };
  }
  return { type: 'final', requestId: message.requestId, ...message.final };
}

class BrosClient {
  /**
   * @param {string} target host:port of a scheduler (or its Service)
   * @param {object} [options] rootCerts / privateKey / certChain (Buffers) for TLS and mTLS;
   *   token: a bearer token sent as `authorization: Bearer <token>` on every call.
   */
  constructor(target, options = {}) {
    const bros = loadBrosPackage(options.protoDir);
    this.stub = new bros.Inference(target, channelCredentials(options));
    this.token = options.token;
  }

  metadata() {
    const md = new grpc.Metadata();
    if (this.token) md.set('authorization', `Bearer ${this.token}`);
    return md;
  }

  callOptions(timeoutMs) {
    return timeoutMs ? { deadline: new Date(Date.now() + timeoutMs) } : {};
  }

  /**
   * Run one request and yield its events as they arrive: every chunk (in index order),
   * then one final. Breaking out of the loop cancels the call and aborts the request. A
   * stream that fails instead (say UNAVAILABLE, "resume after index N") leaves the request
   * running: call generate again with the same requestId and resumeFromIndex to go on.
   */
  async *generate(options, { timeoutMs } = {}) {
    const request = generateRequest(options);
    const call = this.stub.Generate(request, this.metadata(), this.callOptions(timeoutMs));
    let finished = false;
    let failed = false;
    try {
      for await (const message of call) {
        const event = toEvent(message);
        finished = event.type === 'final';
        yield event;
      }
    } catch (err) {
      failed = true;
      throw err;
    } finally {
      call.cancel(); // no-op once the stream has ended
      // The caller stopped reading: abort now. The server cannot tell a cancel from a lost
      // connection, so on its own it waits out its resume grace first.
      if (!finished && !failed) await this.abort(request.requestId, { timeoutMs: 2000 }).catch(() => {});
    }
  }

  /** Stop a request; resolves to false if it had already finished. */
  abort(requestId, { timeoutMs = 5000 } = {}) {
    return new Promise((resolve, reject) => {
      this.stub.Abort({ requestId }, this.metadata(), this.callOptions(timeoutMs),
        (err, response) => (err ? reject(err) : resolve(response.aborted)));
    });
  }

  /** Queues, workers and recent target attainment (bros.v1.LoadReport). */
  getLoad({ timeoutMs = 5000 } = {}) {
    return new Promise((resolve, reject) => {
      this.stub.GetLoad({}, this.metadata(), this.callOptions(timeoutMs),
        (err, report) => (err ? reject(err) : resolve(report)));
    });
  }

  close() {
    this.stub.close();
  }
}

module.exports = { BrosClient, loadBrosPackage, generateRequest, channelCredentials };
