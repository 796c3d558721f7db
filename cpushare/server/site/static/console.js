// Refreshes the console tail of /vms/ID/console from /api/console every
// few seconds.  Only an enhancement: the page's Refresh link does the same.
"use strict";

(function () {
  var pre = document.getElementById("console");
  if (!pre || !window.fetch) { return; }
  var vm = Number(pre.getAttribute("data-vm"));
  var seconds = Number(pre.getAttribute("data-poll")) || 5;

  function poll() {
    fetch("/api/console?vm=" + vm, {credentials: "same-origin",
                                    headers: {"Accept": "application/json"}})
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (answer) {
        if (!answer || !answer.lines) { return; }
        var text = answer.lines.map(function (line) { return line + "\n"; }).join("");
        if (pre.textContent !== text) {
          var atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
          pre.textContent = text;
          if (atBottom) { pre.scrollTop = pre.scrollHeight; }
        }
      })
      .catch(function () {})
      .then(function () { window.setTimeout(poll, seconds * 1000); });
  }

  window.setTimeout(poll, seconds * 1000);
})();
