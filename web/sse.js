// Reading a text/event-stream response body as it arrives (fetch's ReadableStream): each
// event goes to handlers.event(type, data) the moment its blank line is in, each comment
// line to handlers.comment(text).  EventSource cannot POST, hence this.
"use strict";

(() => {
  async function readServerSentEvents(body, handlers) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        dispatch(block, handlers);
      }
    }
    if (buffer.trim()) dispatch(buffer, handlers);
  }

  function dispatch(block, handlers) {
    let type = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) {
        handlers.comment(line.slice(1).trim());
        continue;
      }
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") type = value;
      else if (field === "data") data.push(value);
    }
    if (data.length) handlers.event(type, data.join("\n"));
  }

  window.chatterd = Object.assign(window.chatterd || {}, { readServerSentEvents });
})();
