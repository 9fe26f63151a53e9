// The app: the API key prompt, and the two views (#chat, #dashboard). Loaded by app.js once
// the page has painted.

import * as api from "./api.js";
import * as chat from "./chat.js";
import * as dashboard from "./dashboard.js";

const $ = (id) => document.getElementById(id);

// One prompt however many calls were refused at once: they all wait for the same answer.
let asking = null;
function askKey() {
  asking ??= new Promise((resolve) => {
    $("key-form").addEventListener(
      "submit",
      () => {
        asking = null;
        resolve($("key-input").value);
        $("key-input").value = "";
      },
      { once: true },
    );
    $("key-dialog").showModal();
  });
  return asking;
}

function route() {
  const view = location.hash === "#dashboard" ? "dashboard" : "chat";
  $("view-chat").hidden = view !== "chat";
  $("view-dashboard").hidden = view !== "dashboard";
  $("tab-chat").classList.toggle("active", view === "chat");
  $("tab-dashboard").classList.toggle("active", view === "dashboard");
  dashboard.show(view === "dashboard");
}

api.onKeyNeeded(askKey);
window.addEventListener("hashchange", route);
dashboard.start();
route();
chat.start().then(
  () => document.body.classList.add("ready"),
  (error) => chat.showError(error.message),
);
