// Server-sent events from a fetch() body. Network chunks split anywhere: inside a line, between "\r" and
// "\n", or in the middle of a multi-byte UTF-8 character. TextDecoder in streaming mode keeps partial
// characters until their last byte arrives, and the line buffer keeps partial lines.

export function createSSEParser(onData) {
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  let dataLines = [];

  function dispatch() {
    if (dataLines.length) onData(dataLines.join("\n"));
    dataLines = [];
  }

  function handleLine(line) {
    if (line === "") return dispatch();
    if (line.startsWith(":")) return;  // comment / keep-alive
    const colon = line.indexOf(":");
    const name = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "data") dataLines.push(value);
  }

  function drainLines(final) {
    for (;;) {
      const match = /\r\n|\r|\n/.exec(buffer);
      // A lone "\r" at the end may be the first half of "\r\n": wait for the next chunk unless this is the end.
      if (!match || (match[0] === "\r" && match.index === buffer.length - 1 && !final)) break;
      handleLine(buffer.slice(0, match.index));
      buffer = buffer.slice(match.index + match[0].length);
    }
  }

  return {
    push(bytes) {
      buffer += decoder.decode(bytes, { stream: true });
      drainLines(false);
    },
    end() {
      buffer += decoder.decode();
      drainLines(true);
      if (buffer) handleLine(buffer);
      buffer = "";
      dispatch();
    },
  };
}

// Reads the whole response body, calling onData(string) per event; resolves when the stream ends.
export async function readEvents(response, onData) {
  const parser = createSSEParser(onData);
  const reader = response.body.getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    parser.push(value);
  }
  parser.end();
}
