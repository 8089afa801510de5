// The one way model output becomes formatted HTML on the chat page: markdown-it with raw
// HTML off, then DOMPurify, returning DOM nodes (never an HTML string to assign).
// docs/web.md says what is allowed and why.
"use strict";

(() => {
  // Links may only go to the web or to mail; everything else (javascript:, data:, vbscript:,
  // relative paths into this site) stays text.
  const SAFE_URL = /^(?:https?:|mailto:)/i;
  const ALLOWED_TAGS = ["p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li",
    "blockquote", "pre", "code", "em", "strong", "s", "del", "a", "table", "thead", "tbody",
    "tr", "th", "td"];
  let markdown = null;
  if (window.markdownit && window.DOMPurify) {
    markdown = window.markdownit({ html: false, linkify: true, typographer: false });
    markdown.disable("image"); // img-src is 'self' anyway; a picture from elsewhere is a beacon
    markdown.validateLink = (url) => SAFE_URL.test(url.trim());
    window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
      if (node.nodeName === "A") { // a followed link must not take the page (or its opener)
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer nofollow");
      }
    });
  }

  // Replace target's children with *text* rendered; plain text if the libraries are missing.
  function renderMarkdown(target, text) {
    if (!markdown) {
      const plain = document.createElement("div");
      plain.className = "plain";
      plain.textContent = text;
      target.replaceChildren(plain);
      return;
    }
    const fragment = window.DOMPurify.sanitize(markdown.render(text), {
      ALLOWED_TAGS, ALLOWED_ATTR: ["href", "title", "start"], ADD_URI_SAFE_ATTR: ["start"],
      ALLOWED_URI_REGEXP: SAFE_URL, RETURN_DOM_FRAGMENT: true,
    });
    target.replaceChildren(fragment);
  }

  window.chatterd = Object.assign(window.chatterd || {}, { renderMarkdown });
})();
