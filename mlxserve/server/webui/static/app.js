// The page's only script tag: it lets the browser paint the page first, then loads the app
// (main.js and its modules). Compiling and running the modules before the first frame delayed
// first paint by tens of milliseconds on a busy machine (bench/webui_paint.py). The callback of
// the frame's requestAnimationFrame runs just before that frame is painted, so a task queued
// from it runs just after; a hidden tab paints no frames, hence the timer too.

const HIDDEN_TAB_MS = 200;
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

requestAnimationFrame(() => setTimeout(start));
setTimeout(start, HIDDEN_TAB_MS);
