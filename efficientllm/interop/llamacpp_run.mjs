// Runs llama.cpp (the prebuilt CPU build inside node-llama-cpp) on one GGUF file.
//
// stdin: one JSON request
//   {model, contextSize, threads,
//    tokenize: [text, ...],                 llama.cpp's own tokenization, no BOS, no special-token parsing
//    greedy:   [{prompt: [ids], tokens: n}, ...]   temperature-0 continuation of token ids
//    score:    [[ids], ...]                 log p(ids[i] | ids[:i]) for i >= 1, one batched pass
//    timing:   {decode: {prompt: [ids], tokens: n}, prefill: [[ids], ...], repeats: r}}
//              wall seconds, model load excluded: n greedy tokens after the prompt (timed from the
//              first to the last, so n - 1 single-token steps; the tokens are returned too), and
//              every prefill sequence evaluated together in one batch (one context sequence each)
// stdout: one JSON reply {tokenized, continuations, logprobs, timings}, in the order asked.
// Token ids go in and out as they are, so no tokenizer stands between llama.cpp and the caller.
// argv[2]: the directory whose node_modules/ holds node-llama-cpp (ES modules ignore NODE_PATH).
import {join} from "node:path";
import {pathToFileURL} from "node:url";

const entry = join(process.argv[2], "node_modules", "node-llama-cpp", "dist", "index.js");
const {getLlama, LlamaLogLevel} = await import(pathToFileURL(entry).href);

async function readStdin() {
    const chunks = [];
    for await (const chunk of process.stdin)
        chunks.push(chunk);
    return JSON.parse(Buffer.concat(chunks).toString("utf8"));
}

async function greedy(sequence, prompt, count) {
    await sequence.clearHistory();
    const out = [];
    if (count === 0)
        return out;
    for await (const token of sequence.evaluate(prompt, {temperature: 0})) {
        out.push(token);
        if (out.length >= count)
            break;
    }
    return out;
}

// log p(next | prefix) = logit(next) - maxLogit - ln(sum exp(logit - maxLogit)), all from one pass
// over the raw logits (the greedy sampler leaves them untouched).
async function score(sequence, tokens) {
    await sequence.clearHistory();
    const input = tokens.map((token, i) => i + 1 < tokens.length
        ? [token, {generateNext: {logits: {filter: {tokens: [tokens[i + 1]], includeTop: 1}}, totalLogitWeight: true}}]
        : token);
    const results = await sequence.controlledEvaluate(input);
    const logprobs = [];
    for (let i = 0; i + 1 < tokens.length; i++) {
        const next = results[i].next;
        const maxLogit = next.logits.values().next().value;  // sorted, highest first
        const target = next.logits.get(tokens[i + 1]);
        logprobs.push(target - maxLogit - Math.log(next.totalLogitWeight));
    }
    return logprobs;
}

// Seconds for count - 1 decode steps (from the first generated token to the last), and the tokens.
async function timeDecode(sequence, prompt, count) {
    await sequence.clearHistory();
    let first = null;
    const tokens = [];
    for await (const token of sequence.evaluate(prompt, {temperature: 0})) {
        tokens.push(token);
        if (first === null)
            first = performance.now();
        if (tokens.length >= count)
            break;
    }
    return {seconds: (performance.now() - first) / 1000, tokens};
}

async function timePrefill(sequences, batch) {
    for (const sequence of sequences)
        await sequence.clearHistory();
    const start = performance.now();
    await Promise.all(batch.map((tokens, i) => sequences[i].evaluateWithoutGeneratingNewTokens(tokens)));
    return (performance.now() - start) / 1000;
}

const request = await readStdin();
const llama = await getLlama({gpu: false, build: "never", skipDownload: true, logLevel: LlamaLogLevel.error,
                              maxThreads: request.threads});
const model = await llama.loadModel({modelPath: request.model, gpuLayers: 0});
const context = await model.createContext({contextSize: request.contextSize, batchSize: request.contextSize,
                                           threads: request.threads,
                                           sequences: Math.max(1, request.timing?.prefill?.length ?? 0)});
const sequence = context.getSequence();
const reply = {tokenized: [], continuations: [], logprobs: [], timings: null};
for (const text of request.tokenize ?? [])
    reply.tokenized.push(Array.from(model.tokenize(text, false)));
for (const {prompt, tokens} of request.greedy ?? [])
    reply.continuations.push(await greedy(sequence, prompt, tokens));
for (const tokens of request.score ?? [])
    reply.logprobs.push(await score(sequence, tokens));
if (request.timing) {
    const {decode, prefill, repeats} = request.timing;
    const others = Array.from({length: Math.max(0, prefill.length - 1)}, () => context.getSequence());
    reply.timings = {decode: [], prefill: [], continuation: []};
    for (let r = 0; r < repeats; r++) {
        const decoded = await timeDecode(sequence, decode.prompt, decode.tokens);
        reply.timings.decode.push(decoded.seconds);
        reply.timings.continuation = decoded.tokens;
        reply.timings.prefill.push(await timePrefill([sequence, ...others], prefill));
    }
}
process.stdout.write(JSON.stringify(reply));
await context.dispose();
await model.dispose();
await llama.dispose();
