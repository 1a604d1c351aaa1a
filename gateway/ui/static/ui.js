// Auto Deploy dashboard: refresh the live parts of the page every few seconds
// (server-rendered fragments), and keep the log tail of the chosen instance.
(function () {
  "use strict";
  var every = parseInt(document.body.getAttribute("data-refresh-ms") || "2000", 10);

  function refreshLive() {
    var regions = document.querySelectorAll("[data-live]");
    var pending = [];
    regions.forEach(function (el) {
      pending.push(fetch(el.getAttribute("data-live"), {credentials: "same-origin", cache: "no-store"})
        .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.text(); })
        .then(function (html) { el.innerHTML = html; }));
    });
    return Promise.all(pending).then(function () {
      var stamp = document.getElementById("updated");
      if (stamp) { stamp.textContent = "live: updated " + new Date().toLocaleTimeString(); }
      syncLogChoices();
    }).catch(function (err) {
      var stamp = document.getElementById("updated");
      if (stamp) { stamp.textContent = "live: update failed (" + err.message + "), retrying"; }
    });
  }

  function syncLogChoices() {
    var select = document.getElementById("log-instance");
    if (!select) { return; }
    var ids = Array.prototype.map.call(document.querySelectorAll("[data-instance]"),
      function (row) { return row.getAttribute("data-instance"); });
    var current = Array.prototype.map.call(select.options, function (o) { return o.value; });
    if (ids.join(",") === current.join(",")) { return; }
    var chosen = select.value;
    select.innerHTML = "";
    ids.forEach(function (id) {
      var opt = document.createElement("option");
      opt.value = id; opt.textContent = id;
      if (id === chosen) { opt.selected = true; }
      select.appendChild(opt);
    });
  }

  function refreshLog() {
    var select = document.getElementById("log-instance");
    var pre = document.getElementById("log");
    if (!select || !pre) { return; }
    if (!select.value) { pre.textContent = "no instance running"; return; }
    fetch(select.getAttribute("data-logs") + encodeURIComponent(select.value),
          {credentials: "same-origin", cache: "no-store"})
      .then(function (r) { return r.text(); })
      .then(function (text) {
        var atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        pre.textContent = text || "(no output yet)";
        if (atBottom) { pre.scrollTop = pre.scrollHeight; }
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var select = document.getElementById("log-instance");
    if (select) { select.addEventListener("change", refreshLog); refreshLog(); }
    setInterval(function () { refreshLive().then(refreshLog); }, every);
  });
})();
