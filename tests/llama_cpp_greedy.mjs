// Greedy tokens from llama.cpp (node-llama-cpp's prebuilt CPU build) for tunelab's GGUF files.
// node llama_cpp_greedy.mjs JOBS.json; JOBS = [{"model": PATH, "prompt": [ids], "n": N}, ...]
// Prints one JSON list of token-id lists, one per job. The prompt goes in as token ids, so
// both sides start from exactly the same tokens.
import {readFileSync} from "node:fs";
import {pathToFileURL} from "node:url";

const lib = await import(pathToFileURL(process.env.NODE_LLAMA_CPP).href);
const llama = await lib.getLlama({gpu: false, build: "never", logLevel: "error"});
const jobs = JSON.parse(readFileSync(process.argv[2], "utf8"));
const results = [];
for (const job of jobs) {
  const model = await llama.loadModel({modelPath: job.model});
  const context = await model.createContext({contextSize: 256});
  const out = [];
  for await (const token of context.getSequence().evaluate(job.prompt, {temperature: 0})) {
    out.push(token);
    if (out.length >= job.n) break;
  }
  await context.dispose();
  await model.dispose();
  results.push(out);
}
console.log(JSON.stringify(results));
process.exit(0);
