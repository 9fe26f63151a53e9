// The chat view: a model picker, streamed answers through /api/chat, Stop, regenerate, edit,
// per-conversation settings. Model output and model names only ever reach the DOM as text
// (textContent, or markdown.js, which builds nodes the same way).

import * as api from "./api.js";
import * as store from "./conversations.js";
import { render } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const NUMBER_OPTIONS = ["temperature", "top_p", "top_k", "num_predict", "num_ctx", "seed"];
const BIG_ANSWER = 100_000;
// Past this many characters an answer is shown as plain text and redrawn at most every
// SLOW_REDRAW_MS while it streams: the page stays responsive whatever a model writes.
const SLOW_REDRAW_MS = 500;

let conversations = store.load();
let conversation = null;
let models = [];
let controller = null;
let editing = null;
let pending = [];

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(text, className, action) {
  const node = element("button", className, text);
  node.type = "button";
  node.addEventListener("click", action);
  return node;
}

export function showError(text) {
  const banner = $("error");
  banner.textContent = text ?? "";
  banner.hidden = !text;
}

function persist() {
  const error = store.save(conversations, conversation?.id);
  if (error) showError(error);
}

// Models and their capabilities --------------------------------------------------------------

export async function loadModels() {
  const tags = await api.json("/api/tags");
  models = await Promise.all(
    tags.models.map(async (m) => ({ name: m.name, capabilities: await api.capabilities(m.name) })),
  );
  const picker = $("model");
  picker.replaceChildren(
    ...models
      .filter((m) => m.capabilities.includes("completion"))
      .map((m) => {
        const option = element("option");
        option.value = m.name;
        option.text = `${m.name} (${m.capabilities.join(", ")})`;
        return option;
      }),
  );
  if (conversation) picker.value = conversation.model ?? "";
  if (conversation && !picker.value && picker.options.length) {
    conversation.model = picker.options[0].value;
    picker.value = conversation.model;
  }
  showCapabilities();
}

function capabilitiesOf(name) {
  return models.find((m) => m.name === name)?.capabilities ?? [];
}

function showCapabilities() {
  const capabilities = capabilitiesOf(conversation?.model);
  $("capabilities").textContent = capabilities.join(" · ");
  $("attach-label").hidden = !capabilities.includes("vision");
}

// Conversations ------------------------------------------------------------------------------

function select(chosen) {
  conversation = chosen;
  editing = null;
  pending = [];
  $("editing").hidden = true;
  $("attachments").replaceChildren();
  $("model").value = conversation.model ?? "";
  if (!$("model").value && $("model").options.length) conversation.model = $("model").value = $("model").options[0].value;
  const settings = { ...store.DEFAULT_SETTINGS, ...conversation.settings };
  for (const [name, value] of Object.entries(settings)) {
    const input = $(name);
    if (input.type === "checkbox") input.checked = Boolean(value);
    else input.value = value;
  }
  showCapabilities();
  persist();
  drawList();
  drawMessages();
}

function newConversation() {
  const created = store.create($("model").value || null);
  conversations.unshift(created);
  select(created);
}

function drawList() {
  $("conversations").replaceChildren(
    ...conversations.map((c) => {
      const item = element("li", c === conversation ? "current" : "");
      item.append(
        button(c.title, "open", () => select(c)),
        button("×", "remove", () => {
          conversations = conversations.filter((other) => other !== c);
          if (c === conversation) {
            if (conversations.length) select(conversations[0]);
            else newConversation();
          } else {
            persist();
            drawList();
          }
        }),
      );
      return item;
    }),
  );
}

function readSettings() {
  for (const name of Object.keys(store.DEFAULT_SETTINGS)) {
    const input = $(name);
    conversation.settings[name] = input.type === "checkbox" ? input.checked : input.value;
  }
  persist();
}

// Messages -----------------------------------------------------------------------------------

function statsText(stats) {
  const parts = [];
  if (stats.ttft_ms !== undefined) parts.push(`first token ${Math.round(stats.ttft_ms)} ms`);
  if (stats.eval_count && stats.eval_duration) {
    parts.push(`${(stats.eval_count / (stats.eval_duration / 1e9)).toFixed(1)} tokens/s`);
  }
  if (stats.eval_count !== undefined) parts.push(`${stats.eval_count} tokens`);
  if (stats.prompt_eval_count !== undefined) parts.push(`${stats.prompt_eval_count} prompt tokens`);
  if (stats.cached_prompt_tokens) parts.push(`${stats.cached_prompt_tokens} cached`);
  if (stats.done_reason) parts.push(stats.done_reason);
  return parts.join(" · ");
}

function fillAnswer(node, message) {
  const thinking = node.querySelector(".thinking");
  thinking.hidden = !message.thinking;
  thinking.querySelector(".thinking-text").textContent = message.thinking ?? "";
  const content = node.querySelector(".content");
  if ((message.content ?? "").length > BIG_ANSWER) {
    content.classList.add("plain");
    content.textContent = message.content;
  } else {
    content.classList.remove("plain");
    content.replaceChildren(render(message.content ?? ""));
  }
  const calls = node.querySelector(".tool-calls");
  calls.replaceChildren(
    ...(message.tool_calls ?? []).map((call) => {
      const row = element("div", "tool-call");
      row.append(
        element("span", "tool-label", "tool call"),
        element("span", "tool-name", call.function?.name ?? ""),
        element("code", "tool-arguments", JSON.stringify(call.function?.arguments ?? {})),
      );
      return row;
    }),
  );
  const notes = [];
  if (message.stopped) notes.push("stopped");
  if (message.error) notes.push(`error: ${message.error}`);
  node.querySelector(".note").textContent = notes.join(" · ");
  node.querySelector(".stats").textContent = message.stats ? statsText(message.stats) : "";
}

function messageNode(message, index) {
  const node = element("article", `message ${message.role}`);
  node.append(element("div", "role", message.role === "user" ? "You" : (message.model ?? "assistant")));
  if (message.role === "user") {
    node.append(element("div", "text", message.content));
    if (message.images?.length) {
      const images = element("div", "images");
      for (const data of message.images) {
        const image = element("img");
        image.src = `data:image/*;base64,${data}`;
        image.alt = "attached image";
        images.append(image);
      }
      node.append(images);
    }
    node.append(button("Edit", "edit", () => startEdit(index)));
    return node;
  }
  const thinking = element("details", "thinking");
  thinking.append(element("summary", "", "Thinking"), element("div", "thinking-text"));
  thinking.open = Boolean(message.thinkingOpen);
  thinking.addEventListener("toggle", () => {
    message.thinkingOpen = thinking.open;
  });
  node.append(
    thinking,
    element("div", "content"),
    element("div", "tool-calls"),
    element("div", "note"),
    element("div", "stats"),
  );
  if (index === conversation.messages.length - 1) {
    node.append(button("Regenerate", "regenerate", regenerate));
  }
  fillAnswer(node, message);
  return node;
}

function drawMessages() {
  const box = $("messages");
  box.replaceChildren(...conversation.messages.map(messageNode));
  box.scrollTop = box.scrollHeight;
}

function startEdit(index) {
  if (controller) return;
  editing = index;
  const message = conversation.messages[index];
  $("prompt").value = message.content;
  pending = [...(message.images ?? [])];
  drawAttachments();
  $("editing").hidden = false;
  $("prompt").focus();
}

function drawAttachments() {
  $("attachments").replaceChildren(
    ...pending.map((data, i) => {
      const image = element("img");
      image.src = `data:image/*;base64,${data}`;
      image.alt = "attachment";
      const item = element("span", "attachment");
      item.append(
        image,
        button("×", "remove", () => {
          pending.splice(i, 1);
          drawAttachments();
        }),
      );
      return item;
    }),
  );
}

async function attach(files) {
  for (const file of files) {
    const url = await new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
    pending.push(url.slice(url.indexOf(",") + 1));
  }
  drawAttachments();
}

// Generation ---------------------------------------------------------------------------------

function wireMessages() {
  const wire = [];
  if (conversation.settings.system) wire.push({ role: "system", content: conversation.settings.system });
  for (const m of conversation.messages) {
    const item = { role: m.role, content: m.content ?? "" };
    if (m.images?.length) item.images = m.images;
    if (m.tool_calls?.length) item.tool_calls = m.tool_calls;
    wire.push(item);
  }
  return wire;
}

function requestBody() {
  const settings = conversation.settings;
  const options = {};
  for (const name of NUMBER_OPTIONS) {
    if (settings[name] !== "" && settings[name] !== undefined) options[name] = Number(settings[name]);
  }
  const body = { model: conversation.model, stream: true, messages: wireMessages(), options };
  if (capabilitiesOf(conversation.model).includes("thinking")) body.think = Boolean(settings.think);
  if (settings.tools.trim()) body.tools = JSON.parse(settings.tools);
  return body;
}

function setBusy(busy) {
  $("stop").hidden = !busy;
  $("send").disabled = busy;
  for (const node of document.querySelectorAll(".regenerate, .edit")) node.disabled = busy;
}

async function generate() {
  let body;
  try {
    body = requestBody();
  } catch (error) {
    showError(`the tools are not valid JSON: ${error.message}`);
    return;
  }
  const answer = { role: "assistant", model: conversation.model, content: "", thinking: "", tool_calls: [] };
  conversation.messages.push(answer);
  conversation.updated = Date.now();
  persist();
  drawMessages();
  const node = $("messages").lastElementChild;
  controller = new AbortController();
  setBusy(true);
  showError(null);
  const started = performance.now();
  let firstToken;
  let scheduled = null;
  const redraw = () => {
    if (scheduled !== null) return;
    const draw = () => {
      scheduled = null;
      fillAnswer(node, answer);
      $("messages").scrollTop = $("messages").scrollHeight;
    };
    scheduled =
      answer.content.length > BIG_ANSWER
        ? setTimeout(draw, SLOW_REDRAW_MS)
        : requestAnimationFrame(draw);
  };
  try {
    const response = await api.call("/api/chat", { method: "POST", body, signal: controller.signal });
    for await (const chunk of api.ndjson(response)) {
      const message = chunk.message ?? {};
      if (firstToken === undefined && (message.content || message.thinking || message.tool_calls)) {
        firstToken = performance.now();
      }
      answer.content += message.content ?? "";
      answer.thinking += message.thinking ?? "";
      if (message.tool_calls) answer.tool_calls.push(...message.tool_calls);
      if (chunk.done) {
        answer.stats = {
          ttft_ms: firstToken === undefined ? undefined : firstToken - started,
          eval_count: chunk.eval_count,
          eval_duration: chunk.eval_duration,
          prompt_eval_count: chunk.prompt_eval_count,
          cached_prompt_tokens: chunk.cached_prompt_tokens,
          done_reason: chunk.done_reason,
        };
      }
      redraw();
    }
  } catch (error) {
    if (error.name === "AbortError") answer.stopped = true;
    else answer.error = error.message;
  } finally {
    controller = null;
    if (conversation.title === "New chat") {
      const first = conversation.messages.find((m) => m.role === "user");
      if (first) conversation.title = first.content.slice(0, 40) || "Image";
    }
    persist();
    drawList();
    drawMessages();
    setBusy(false);
  }
}

async function send(event) {
  event.preventDefault();
  if (controller || !conversation.model) return;
  const text = $("prompt").value;
  if (!text.trim() && !pending.length) return;
  readSettings();
  if (editing !== null) conversation.messages.splice(editing);
  const message = { role: "user", content: text };
  if (pending.length) message.images = pending;
  conversation.messages.push(message);
  $("prompt").value = "";
  editing = null;
  pending = [];
  $("editing").hidden = true;
  drawAttachments();
  await generate();
}

async function regenerate() {
  if (controller) return;
  readSettings();
  while (conversation.messages.at(-1)?.role === "assistant") conversation.messages.pop();
  await generate();
}

// Wiring -------------------------------------------------------------------------------------

export async function start() {
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) send(event);
  });
  $("stop").addEventListener("click", () => controller?.abort());
  $("new-chat").addEventListener("click", newConversation);
  $("export").addEventListener("click", () => store.exportJson(conversations));
  $("attach").addEventListener("change", async (event) => {
    await attach(event.target.files);
    event.target.value = "";
  });
  $("cancel-edit").addEventListener("click", () => {
    editing = null;
    pending = [];
    $("prompt").value = "";
    $("editing").hidden = true;
    drawAttachments();
  });
  $("model").addEventListener("change", () => {
    conversation.model = $("model").value;
    showCapabilities();
    persist();
  });
  $("settings").addEventListener("change", readSettings);
  const saved = conversations.find((c) => c.id === store.currentId()) ?? conversations[0];
  if (saved) select(saved);
  else newConversation();
  await loadModels();
  persist();
}
