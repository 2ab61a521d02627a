// tunefit's page script: small enhancements on top of htmx; the page works without it.
"use strict";

// Tell screen readers the result is being recomputed while htmx waits for it.
document.addEventListener("htmx:beforeRequest", function (event) {
  var result = document.getElementById("result");
  if (result && event.detail.target === result) {
    result.setAttribute("aria-busy", "true");
  }
});
