// The live list of decisions: new rows from /ui/live (server-sent events), with a pause toggle.
// The page works without it; this only saves reloading.
(function () {
  var table = document.querySelector("#decisions tbody");
  var pause = document.getElementById("pause");
  if (!table || !window.EventSource) { return; }
  var paused = false;
  pause.hidden = false;
  pause.addEventListener("click", function () {
    paused = !paused;
    pause.textContent = paused ? "Resume live" : "Pause";
  });
  function cell(row, text, href) {
    var td = row.insertCell();
    if (href) {
      var a = document.createElement("a");
      a.href = href;
      a.textContent = text;
      td.appendChild(a);
    } else {
      td.textContent = text == null ? "" : text;
    }
  }
  var source = new EventSource("/ui/live");
  source.onmessage = function (message) {
    if (paused) { return; }
    var d = JSON.parse(message.data);
    var row = table.insertRow(0);
    row.className = "live";
    cell(row, d.at);
    cell(row, d.event_id == null ? "-" : String(d.event_id),
         d.event_id == null ? null : "/ui/events/" + d.event_id);
    cell(row, d.iccid); cell(row, d.rule); cell(row, d.action); cell(row, d.outcome);
    while (table.rows.length > 200) { table.deleteRow(-1); }
  };
})();
