// gmesh dashboard: keep <main> current from the server's event stream (server-rendered HTML,
// escaped there). No framework, no build step.
(() => {
  "use strict";
  const main = document.getElementById("main");
  const live = document.getElementById("live");
  const page = location.pathname + location.search;
  const events = new EventSource("/events?page=" + encodeURIComponent(page));
  const say = (text, cls) => {
    live.textContent = text;
    live.className = "live " + cls;
  };
  // what the reader opened or closed stays so across updates
  const folded = new Map();
  main.addEventListener("toggle", (ev) => {
    const d = ev.target;
    if (d.dataset && d.dataset.key) folded.set(d.dataset.key, d.open);
  }, true);
  events.addEventListener("main", (ev) => {
    main.innerHTML = ev.data;
    main.querySelectorAll("details[data-key]").forEach((d) => {
      if (folded.has(d.dataset.key)) d.open = folded.get(d.dataset.key);
    });
    main.dataset.updated = String(Date.now());
    say("live", "ok");
  });
  events.onopen = () => say("live", "ok");
  events.onerror = () => say("dashboard unreachable: reconnecting…", "bad");
})();
