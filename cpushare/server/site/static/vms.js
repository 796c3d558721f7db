// Keeps the VMs table of /vms up to date by asking /api/vms every few
// seconds.  Only an enhancement: without it the page's Refresh link does
// the same.  Text goes in with textContent, never as HTML.
"use strict";

(function () {
  var table = document.getElementById("vms");
  if (!table || !window.fetch) { return; }
  var seconds = Number(table.getAttribute("data-poll")) || 5;

  function amount(micro) {
    var sign = micro < 0 ? "-" : "";
    var text = (Math.abs(micro) / 1e6).toFixed(6).replace(/0{1,4}$/, "");
    return sign + text;
  }

  function duration(seconds) {
    seconds = Math.floor(seconds || 0);
    var h = Math.floor(seconds / 3600), m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
    function two(n) { return (n < 10 ? "0" : "") + n; }
    if (h) { return h + " h " + two(m) + " min " + two(s) + " s"; }
    if (m) { return m + " min " + two(s) + " s"; }
    return s + " s";
  }

  function show(vm) {
    var row = table.querySelector('tr[data-vm="' + Number(vm.vm) + '"]');
    if (!row) { return false; }
    var values = {state: vm.state, seller: vm.seller, ip: vm.ip, reason: vm.reason,
                  cpu: duration(vm.cpu_seconds), cost: amount(vm.cost || 0)};
    Object.keys(values).forEach(function (key) {
      var cell = row.querySelector('[data-key="' + key + '"]');
      var value = values[key] === undefined || values[key] === null ? "" : String(values[key]);
      if (cell && cell.textContent !== value) { cell.textContent = value; }
    });
    return true;
  }

  function poll() {
    fetch("/api/vms", {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (answer) {
        if (!answer || !answer.vms) { return; }
        var unseen = answer.vms.filter(function (vm) { return !show(vm); }).length;
        var note = document.getElementById("newvms");
        if (unseen && !note) {
          note = document.createElement("p");
          note.id = "newvms";
          note.className = "note";
          var link = document.createElement("a");
          link.href = "/vms";
          link.textContent = "New VMs: show them";
          note.appendChild(link);
          table.parentNode.insertBefore(note, table);
        }
      })
      .catch(function () {})
      .then(function () { window.setTimeout(poll, seconds * 1000); });
  }

  window.setTimeout(poll, seconds * 1000);
})();
