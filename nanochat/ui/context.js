// Fitting a request into the model's context. Only the server has the tokenizer, so the page asks it to count
// (POST /v1/tokenize answers {count, max_seq_len}, counted exactly as the completion endpoints count) and then:
//   - asks for max_tokens = min(the setting, the room the prompt leaves), so a normal chat never gets a 400;
//   - when the prompt leaves the reply less than RESERVE_FRACTION of the context (or less than the setting, if
//     smaller), chat drops the oldest turns and raw mode cuts the start of the prompt, and says so in the page.
// `count(body)` is the caller's fetch of /v1/tokenize, resolving to {count, context}.

const RESERVE_FRACTION = 1 / 4;

function reserveFor(context, wanted) {
  return Math.min(wanted, Math.ceil(context * RESERVE_FRACTION));
}

// turns: [{role, content}] ending with the user's message; systemPrompt: "" for none.
// Resolves to {messages, maxTokens, capped, notice}; rejects when the last message alone overflows the context.
export async function fitChat(turns, systemPrompt, wanted, count) {
  const from = (start) => {
    const kept = turns.slice(start);
    return systemPrompt ? [{ role: "system", content: systemPrompt }, ...kept] : kept;
  };
  const whole = await count({ messages: from(0) });
  const { context } = whole;
  const reserve = reserveFor(context, wanted);
  let start = 0;
  let tokens = whole.count;
  if (tokens + reserve > context) {
    // the server needs the kept part to start at a user turn; fewer dropped turns never count fewer tokens, so
    // bisect for the most history that still leaves the reserve (or keep only the last message if none does)
    const starts = turns.flatMap((turn, i) => (turn.role === "user" && i > 0 ? [i] : []));
    let lo = -1;
    let hi = starts.length - 1;
    if (hi >= 0) {
      tokens = (await count({ messages: from(starts[hi]) })).count;
      while (hi - lo > 1 && tokens + reserve <= context) {
        const mid = Math.floor((lo + hi) / 2);
        const counted = (await count({ messages: from(starts[mid]) })).count;
        if (counted + reserve > context) {
          lo = mid;
        } else {
          hi = mid;
          tokens = counted;
        }
      }
      start = starts[hi];
    }
  }
  if (tokens >= context) {
    throw new Error(`Your message needs ${tokens} tokens${systemPrompt ? " with the system prompt" : ""}, but ` +
                    `this model's context is ${context} tokens; shorten it.`);
  }
  const maxTokens = Math.min(wanted, context - tokens);
  const notice = start === 0 ? "" : (start === 1 ? "The oldest message was left out: it no longer fits" :
    `The ${start} oldest messages were left out: they no longer fit`) + ` the model's ${context}-token context.`;
  return { messages: from(start), maxTokens, capped: maxTokens < wanted, notice };
}

// Resolves to {prompt, maxTokens, capped, notice}: the prompt keeps its end, the text the model continues.
export async function fitPrompt(prompt, wanted, count) {
  const chars = Array.from(prompt);  // code points: a cut never splits a surrogate pair
  let { count: tokens, context } = await count({ prompt });
  const budget = context - reserveFor(context, wanted);
  let kept = chars.length;
  while (tokens > budget && kept > 1) {
    // tokens per character vary along the text: cut in proportion with a margin, then count again
    kept = Math.max(1, Math.min(kept - 1, Math.floor((kept * budget * 0.9) / tokens)));
    ({ count: tokens } = await count({ prompt: chars.slice(-kept).join("") }));
  }
  if (tokens >= context) {
    throw new Error(`The prompt needs ${tokens} tokens, but this model's context is ${context} tokens.`);
  }
  const cut = chars.length - kept;
  const maxTokens = Math.min(wanted, context - tokens);
  const notice = cut === 0 ? "" : (cut === 1 ? "The first character of the prompt was left out: it does not" :
    `The first ${cut} characters of the prompt were left out: they do not`) + ` fit the model's ${context}-token ` +
    "context.";
  return { prompt: chars.slice(-kept).join(""), maxTokens, capped: maxTokens < wanted, notice };
}
