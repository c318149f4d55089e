#!/usr/bin/env node
'use strict';
/**
 * Stream one Generate from a bros scheduler.
 *
 *   node examples/generate.js [--target HOST:PORT] [--class rt|be] [--max-tokens N]
 *        [--ttft-ms N] [--tpot-ms N] [--temperature X] [--token] [--token-ids] [--json]
 *        [--stop-after N] PROMPT
 *
 * PROMPT is text, or with --token-ids a comma-separated list of token ids. Text goes to
 * stdout as it arrives and a timing line to stderr; --json prints one JSON object per
 * event instead (what tests read). The target defaults to $BROS_TARGET or 127.0.0.1:50051,
 * the token to $BROS_TOKEN. --stop-after N stops reading after N chunks, which aborts the
 * request (as a user pressing "stop" would).
 */
const { parseArgs } = require('node:util');
const { BrosClient } = require('../bros-client');

function parse(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      target: { type: 'string', default: process.env.BROS_TARGET || '127.0.0.1:50051' },
      class: { type: 'string', default: 'rt' },
      'max-tokens': { type: 'string', default: '32' },
      'ttft-ms': { type: 'string', default: '0' },
      'tpot-ms': { type: 'string', default: '0' },
      temperature: { type: 'string' },
      token: { type: 'string', default: process.env.BROS_TOKEN || '' },
      'token-ids': { type: 'boolean', default: false },
      json: { type: 'boolean', default: false },
      'stop-after': { type: 'string' },
    },
  });
  if (positionals.length !== 1) throw new Error('exactly one PROMPT argument is required');
  const request = {
    serviceClass: values.class,
    maxTokens: Number(values['max-tokens']),
    ttftMs: Number(values['ttft-ms']),
    tpotMs: Number(values['tpot-ms']),
  };
  if (values.temperature !== undefined) request.temperature = Number(values.temperature);
  if (values['token-ids']) request.tokenIds = positionals[0].split(',').map(Number);
  else request.text = positionals[0];
  return { values, request };
}

async function main() {
  const { values, request } = parse(process.argv.slice(2));
  const client = new BrosClient(values.target, { token: values.token || undefined });
  const stopAfter = values['stop-after'] === undefined ? Infinity : Number(values['stop-after']);
  let chunks = 0;
  try {
    for await (const event of client.generate(request, { timeoutMs: 120000 })) {
      if (event.type === 'chunk' && chunks++ === stopAfter) break;
      if (values.json) {
        process.stdout.write(`${JSON.stringify(event)}\n`);
      } else if (event.type === 'chunk') {
        process.stdout.write(event.text);
      } else {
        process.stderr.write(`\n${event.finishReason}: ${event.numOutputTokens} tokens, queue ` +
          `${event.queueMs.toFixed(0)} ms, TTFT ${event.ttftMs.toFixed(0)} ms, TPOT ${event.tpotMs.toFixed(1)} ms` +
          `${event.error ? `, error: ${event.error}` : ''}\n`);
      }
    }
  } finally {
    client.close();
  }
}

main().catch((err) => {
  // A gRPC failure carries its status; print it the way grpcurl does.
  const status = err.code !== undefined ? `${err.code} ${err.details || err.message}` : err.message;
  process.stderr.write(`generate failed: ${status}\n`);
  process.exit(1);
});
