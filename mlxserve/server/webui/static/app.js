// The page's only script tag: it lets the browser paint the page first, then loads the app
// (main.js and its modules). Compiling and running the modules before the first frame delayed
// first paint on a busy machine (bench/webui_paint.py). The callback of a frame's
// requestAnimationFrame runs just before that frame is painted, so a task queued from it runs
// just after. A hidden tab paints no frames: there the app starts at once, and a tab hidden
// before its first frame starts it when its visibility changes.

let started = false;

function start() {
  if (started) return;
  started = true;
  import("./main.js").catch((error) => {
    const banner = document.getElementById("error");
    banner.textContent = `The page could not load: ${error.message}`;
    banner.hidden = false;
  });
}

if (document.visibilityState === "hidden") {
  start();
} else {
  requestAnimationFrame(() => setTimeout(start));
  document.addEventListener("visibilitychange", start, { once: true });
}
