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
  events.addEventListener("main", (ev) => {
    const open = new Set();
    main.querySelectorAll("details[data-key]").forEach((d) => {
      if (d.open) open.add(d.dataset.key);
    });
    main.innerHTML = ev.data;
    main.querySelectorAll("details[data-key]").forEach((d) => {
      if (open.has(d.dataset.key)) d.open = true;
    });
    main.dataset.updated = String(Date.now());
    say("live", "ok");
  });
  events.onopen = () => say("live", "ok");
  events.onerror = () => say("dashboard unreachable: reconnecting…", "bad");
})();
