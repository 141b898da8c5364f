// Drives the chat page in headless Debian Chromium. One test per run:
//
// - chat: two people chat, the typing indicator shows, an XSS payload renders as text (and no
//   alert fires), a dropped connection resumes without losing a message, "load older" pages
//   through history.
// - direct: ann opens a direct conversation with bob from the online list and writes; bob's
//   page shows the conversation and the message without a click; bob answers, ann sees it; a
//   dropped connection resumes the conversation, a reload brings it back with its history.
// - socketio: a page using the official socket.io-client bundle (node_modules) with the seed's
//   calls and the native page chat in the default room `general`, each seeing the other's
//   messages and the Socket.IO user online.
// - state: chat state between Ada and Ben in one room: Ada edits a message (Ben sees the new
//   body and "(edited)"), Ben reacts (Ada sees the chip "👍 1", her click makes it 2), Ada
//   deletes one (Ben sees a tombstone), a reload shows the same from `history`; an edit of
//   another's message shows the `forbidden` toast; unread badges count, a second page of Ben's
//   gets them from `joined.unread`, and Ben reading the room on one page clears the badge on the
//   other (`read`); the conversation list brings Ada's direct conversation into that page.
//
// Usage: node chat.test.mjs <server-url> <out-dir> <test>   (screenshot: <out-dir>/<test>.png)
//        node chat.test.mjs --list                          (the test names, one a line)
//
// Every wait is bounded; the whole run is capped by a watchdog. Exit code 0 = passed.

import { chromium } from "playwright-core";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const TESTS = { chat, direct, socketio, state: chatState };

if (process.argv[2] === "--list") {
  console.log(Object.keys(TESTS).join("\n"));
  process.exit(0);
}
const [url, outDir, testName] = process.argv.slice(2);
if (!url || !outDir || !Object.hasOwn(TESTS, testName ?? "")) {
  console.error(`usage: node chat.test.mjs <server-url> <out-dir> <${Object.keys(TESTS).join("|")}>`);
  process.exit(2);
}
const screenshot = join(outDir, `${testName}.png`);

const WAIT = 10_000;
const watchdog = setTimeout(() => {
  console.error(`browser test ${testName}: timed out after 90 s`);
  process.exit(1);
}, 90_000);

const XSS = "<img src=x onerror=alert(1)>";
const ROOM = "browser-test";
const problems = [];
// Every WebSocket frame each page sent and received, parsed (across reloads and reconnects).
const frames = new WeakMap();

function step(text) {
  console.log(`  - ${text}`);
}

function sentFrames(page) {
  return frames.get(page).sent;
}

function receivedFrames(page) {
  return frames.get(page).received;
}

// Polls `probe` until it returns something truthy; throws after WAIT.
async function until(probe, what) {
  const end = Date.now() + WAIT;
  for (;;) {
    const value = probe();
    if (value) return value;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

// A page in a new browser context (its own localStorage, like another browser), with every
// WebSocket frame recorded and page errors, console errors and dialogs counted as problems.
// `storage`: localStorage entries set before the page's script runs.
async function newPage(browser, name, storage = null) {
  const context = await browser.newContext({ viewport: { width: 1180, height: 720 } });
  if (storage) {
    await context.addInitScript((entries) => {
      for (const [k, v] of Object.entries(entries)) localStorage.setItem(k, v);
    }, storage);
  }
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  const log = { sent: [], sentAt: [], received: [] };
  frames.set(page, log);
  const parse = (payload) => {
    try { return JSON.parse(String(payload)); } catch { return { unparsed: String(payload) }; }
  };
  page.on("websocket", (ws) => {
    ws.on("framesent", (f) => {
      log.sent.push(parse(f.payload));
      log.sentAt.push(Date.now());
    });
    ws.on("framereceived", (f) => log.received.push(parse(f.payload)));
  });
  page.on("dialog", async (d) => {
    problems.push(`${name}: a ${d.type()} dialog fired: ${d.message()}`);
    await d.dismiss();
  });
  page.on("pageerror", (e) => problems.push(`${name}: page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`${name}: console error: ${m.text()}`);
  });
  return page;
}

async function open(browser, name, room = ROOM) {
  const page = await newPage(browser, name);
  await page.goto(url);
  await page.locator("#name-input").fill(name);
  await page.locator("#name-form button[type=submit]").click();
  await page.locator("#status.online").waitFor();
  await page.locator("#join-input").fill(room);
  await page.locator("#join-input").press("Enter");
  await page.locator(`#rooms li.active[data-room="${room}"]`).waitFor();
  await page.locator("#text:not([disabled])").waitFor();
  return page;
}

async function say(page, text) {
  await page.locator("#text").fill(text);
  await page.locator("#text").press("Enter");
}

function message(page, body) {
  return page.locator("#messages .msg .body").filter({ hasText: body }).first();
}

// Joins `room` with the sidebar's form; it becomes the current room.
async function joinRoom(page, room) {
  await page.locator("#join-input").fill(room);
  await page.locator("#join-input").press("Enter");
  await page.locator(`#rooms li.active[data-room="${room}"]`).waitFor();
  await page.locator("#text:not([disabled])").waitFor();
}

async function chat(browser) {
  const alice = await open(browser, "Alice");
  const bob = await open(browser, "Bob");
  step("Alice and Bob joined #" + ROOM);

  await alice.locator("#online li", { hasText: "Bob" }).waitFor();
  await bob.locator("#online li", { hasText: "Alice" }).waitFor();
  step("each sees the other online");

  await say(alice, "Hello from Alice");
  const got = message(bob, "Hello from Alice");
  await got.waitFor();
  const from = await got.locator("xpath=..").locator(".from").textContent();
  if (from !== "Alice") problems.push(`sender shown as ${JSON.stringify(from)}, expected "Alice"`);
  step("Bob received Alice's message with her name");

  await bob.locator("#text").pressSequentially("typing…", { delay: 20 });
  await alice.locator("#typing", { hasText: "Bob is typing" }).waitFor();
  step("Alice sees Bob typing");
  await bob.locator("#text").fill("");

  await say(bob, XSS);
  const xss = message(alice, "onerror");
  await xss.waitFor();
  const shown = await xss.textContent();
  if (shown !== XSS) problems.push(`XSS payload shown as ${JSON.stringify(shown)}`);
  const imgs = await alice.locator("#messages img").count();
  if (imgs !== 0) problems.push(`the XSS payload created ${imgs} <img> element(s)`);
  await alice.waitForTimeout(500); // give a broken page the chance to fire the alert
  step("the XSS payload shows literally, no element created, no alert");

  // Drop Alice's connection; Bob writes meanwhile; Alice resumes from her last cursor.
  await alice.evaluate(() => state.ws.close());
  await alice.locator("#status.offline").waitFor();
  await say(bob, "while you were away");
  await alice.locator("#status.online").waitFor();
  await message(alice, "while you were away").waitFor();
  const copies = await alice.locator("#messages .msg .body", { hasText: "Hello from Alice" }).count();
  if (copies !== 1) problems.push(`after resume, "Hello from Alice" shows ${copies} times`);
  step("after a dropped connection Alice resumed and got the missed message once");

  // "Load older": 55 messages in a fresh room; a newcomer sees the newest 50, then all.
  await bob.locator("#join-input").fill("history-test");
  await bob.locator("#join-input").press("Enter");
  await bob.locator("#text:not([disabled])").waitFor();
  await bob.evaluate(() => {
    for (let i = 1; i <= 55; i++) send({ type: "send", room: "history-test", body: `old ${i}` });
  });
  await message(bob, "old 55").waitFor();
  const carol = await browser
    .newContext({ viewport: { width: 1000, height: 700 } })
    .then((c) => c.newPage());
  carol.setDefaultTimeout(WAIT);
  carol.on("pageerror", (e) => problems.push(`Carol: page error: ${e.message}`));
  await carol.goto(url);
  await carol.locator("#name-input").fill("Carol");
  await carol.locator("#name-form button[type=submit]").click();
  await carol.locator("#join-input").fill("history-test");
  await carol.locator("#join-input").press("Enter");
  await message(carol, "old 55").waitFor();
  const firstPage = await carol.locator("#messages .msg").count();
  if (firstPage !== 50) problems.push(`first history page shows ${firstPage} messages, expected 50`);
  await carol.locator("#older").click();
  await message(carol, "old 1").waitFor();
  const bodies = await carol.locator("#messages .msg .body").allTextContents();
  const want = Array.from({ length: 55 }, (_, i) => `old ${i + 1}`);
  if (JSON.stringify(bodies) !== JSON.stringify(want)) {
    problems.push(`after "load older": ${bodies.length} messages, not old 1…old 55 in order`);
  }
  if (!(await carol.locator("#older-wrap").isHidden())) {
    problems.push(`"load older" still offered at the beginning of history`);
  }
  step('a newcomer sees the newest 50, "load older" brings the rest in order');

  await say(alice, "Back again!");
  await bob.locator(`#rooms li[data-room="${ROOM}"]`).click();
  await message(bob, "Back again").waitFor();
  await alice.locator("#text").fill("");
  await alice.screenshot({ path: screenshot });
  step(`screenshot: ${screenshot}`);
}

async function direct(browser) {
  const room = "direct-test";
  const ann = await open(browser, "ann", room);
  const bob = await open(browser, "bob", room);
  step(`ann and bob joined #${room}`);

  // ann clicks bob under "Online".
  await ann.locator("#online li.user").filter({ hasText: /^bob$/ }).click();
  const annEntry = ann.locator('#rooms li.dm.active[data-dm="bob"]');
  await annEntry.waitFor();
  const label = await annEntry.locator(".room-name").textContent();
  if (label !== "@bob") problems.push(`ann's conversation entry is labelled ${JSON.stringify(label)}, expected "@bob"`);
  await ann.locator("#room-title", { hasText: "@bob" }).waitFor();
  await ann.locator("#text:not([disabled])").waitFor();
  step("ann opened a conversation with bob from the online list");

  const HI = "hi bob, <b>only you</b> see this";
  await say(ann, HI);
  await message(ann, "only you").waitFor();
  const sentHi = await until(() => sentFrames(ann).find((f) => f.type === "send" && f.body === HI), "ann's send frame");
  if (sentHi.to !== "bob" || "room" in sentHi || !sentHi.client_id) {
    problems.push(`ann's direct message went out as ${JSON.stringify(sentHi)}, expected {type:"send",to:"bob",body,client_id}`);
  }
  step('ann wrote to bob: {"type":"send","to":"bob",…}; her own copy shows');

  // bob does nothing: the conversation appears with the message in its preview.
  const bobEntry = bob.locator('#rooms li.dm[data-dm="ann"]');
  await bobEntry.waitFor();
  await bobEntry.locator(".preview", { hasText: "only you" }).waitFor();
  const preview = await bobEntry.locator(".preview").textContent();
  if (preview !== HI) problems.push(`bob's preview shows ${JSON.stringify(preview)}, expected ${JSON.stringify(HI)}`);
  if ((await bob.locator("#rooms b").count()) !== 0) problems.push("the markup in the message created an element in bob's room list");
  const badge = await bobEntry.locator(".badge").textContent().catch(() => null);
  if (badge !== "1") problems.push(`bob's unread badge shows ${JSON.stringify(badge)}, expected "1"`);
  if ((await bob.locator(`#rooms li.active[data-room="${room}"]`).count()) !== 1) {
    problems.push(`bob's page left #${room} by itself`);
  }
  const got = receivedFrames(bob).find((f) => f.type === "message" && f.body === HI);
  if (!got || !String(got.room).startsWith("dm.") || got.from !== "ann" || got.to !== "bob") {
    problems.push(`bob received ${JSON.stringify(got)}, expected a message in a dm. room from ann to bob`);
  }
  step("bob's page shows the conversation with ann and her message, without a click");

  await bobEntry.click();
  await bob.locator("#room-title", { hasText: "@ann" }).waitFor();
  await message(bob, "only you").waitFor();
  // The page joined the conversation and loaded its history: the message stays single.
  await until(() => receivedFrames(bob).find((f) => f.type === "history" && f.room === got?.room), "bob's history of the conversation");
  const bobCopies = await bob.locator("#messages .msg .body", { hasText: "only you" }).count();
  if (bobCopies !== 1) problems.push(`bob's conversation shows ann's message ${bobCopies} times`);
  // Both pages have joined the conversation's room by now: the answer must reach each once
  // (the spec: from the room, not a second time as a direct copy; the page would hide a copy).
  for (const [who, page] of [["ann", ann], ["bob", bob]]) {
    await until(() => receivedFrames(page).find((f) => f.type === "joined" && f.room === got?.room), `${who} joined the conversation`);
  }
  const REPLY = "hello ann, got it";
  await say(bob, REPLY);
  const sentReply = await until(() => sentFrames(bob).find((f) => f.type === "send" && f.body === REPLY), "bob's send frame");
  if (sentReply.to !== "ann" || "room" in sentReply) problems.push(`bob's answer went out as ${JSON.stringify(sentReply)}`);
  const answer = message(ann, REPLY);
  await answer.waitFor();
  await ann.waitForTimeout(300); // a second copy would be right behind the first
  for (const [who, page] of [["ann", ann], ["bob", bob]]) {
    const copies = receivedFrames(page).filter((f) => f.type === "message" && f.body === REPLY);
    if (copies.length !== 1) problems.push(`${who}'s connection received the answer ${copies.length} times: ${JSON.stringify(copies)}`);
  }
  const from = await answer.locator("xpath=..").locator(".from").textContent();
  if (from !== "bob") problems.push(`ann sees the answer from ${JSON.stringify(from)}, expected "bob"`);
  const annRoom = await annEntry.getAttribute("data-room");
  const bobRoom = await bobEntry.getAttribute("data-room");
  if (!annRoom || annRoom !== bobRoom) problems.push(`the two sides name the conversation ${annRoom} and ${bobRoom}`);
  step(`bob answered in the conversation; ann sees it (room ${annRoom})`);

  // ann's connection drops; bob writes meanwhile; ann resumes the conversation with `since`.
  const AWAY = "while you were away, privately";
  await ann.evaluate(() => state.ws.close());
  await ann.locator("#status.offline").waitFor();
  await say(bob, AWAY);
  await ann.locator("#status.online").waitFor();
  await message(ann, AWAY).waitFor();
  const rejoin = sentFrames(ann).find((f) => f.type === "join" && f.room === annRoom && f.since);
  if (!rejoin) problems.push("ann's page did not rejoin the conversation with since");
  for (const body of [HI, REPLY, AWAY]) {
    const n = await ann.locator("#messages .msg .body").filter({ hasText: body }).count();
    if (n !== 1) problems.push(`after the resume ann sees ${JSON.stringify(body)} ${n} times`);
  }
  step("after a dropped connection ann resumed the conversation and got the missed message once");

  // A reload brings the conversation back (it is the current one) and loads its history.
  await ann.reload();
  await ann.locator("#status.online").waitFor();
  await ann.locator('#rooms li.dm.active[data-dm="bob"]').waitFor();
  await message(ann, AWAY).waitFor();
  const bodies = await ann.locator("#messages .msg .body").allTextContents();
  if (JSON.stringify(bodies) !== JSON.stringify([HI, REPLY, AWAY])) {
    problems.push(`after a reload ann's conversation shows ${JSON.stringify(bodies)}`);
  }
  step("after a reload ann's conversation is back with its history");

  await bob.locator("#text").fill("");
  await bob.screenshot({ path: screenshot });
  step(`screenshot: ${screenshot}`);
}

// The official client's browser bundle, as an app would serve it.
const SOCKET_IO_BUNDLE = join(
  dirname(fileURLToPath(import.meta.url)),
  "node_modules/socket.io-client/dist/socket.io.min.js",
);

async function socketio(browser) {
  const alice = await open(browser, "Alice", "general");
  step("Alice joined #general on the native page");

  // Any page of the server's origin will do for the bundle; the chat page's CSP allows no
  // foreign scripts, so /healthz it is.
  const context = await browser.newContext();
  const sio = await context.newPage();
  sio.setDefaultTimeout(WAIT);
  sio.on("pageerror", (e) => problems.push(`Socket.IO page: page error: ${e.message}`));
  await sio.goto(`${url}healthz`);
  await sio.addScriptTag({ path: SOCKET_IO_BUNDLE });
  await sio.evaluate(() => {
    // The seed's client code, plus a name (the server checks no tokens here).
    window.got = [];
    window.socket = io({ auth: { name: "Sio" } });
    socket.on("message", (m) => got.push(m));
  });
  await sio.waitForFunction(() => window.socket.connected);
  step("the Socket.IO page connected (Engine.IO transport: " + (await sio.evaluate(() => socket.io.engine.transport.name)) + ")");

  await alice.locator("#online li", { hasText: "Sio" }).waitFor();
  step("Alice sees the Socket.IO user online");

  await sio.evaluate(() => socket.emit("event:message", { message: "Hello from Socket.IO" }));
  const got = message(alice, "Hello from Socket.IO");
  await got.waitFor();
  const from = await got.locator("xpath=..").locator(".from").textContent();
  if (from !== "Sio") problems.push(`Socket.IO sender shown as ${JSON.stringify(from)}, expected "Sio"`);
  step("Alice received the seed-style message with the sender's name");

  await say(alice, "Hello back from the native page");
  const echo = await sio.waitForFunction(
    () => window.got.find((m) => m.message === "Hello back from the native page"),
  );
  const m = await echo.jsonValue();
  if (m.from !== "Alice" || m.room !== "general" || typeof m.cursor !== "string") {
    problems.push(`the Socket.IO page got ${JSON.stringify(m)}`);
  }
  step("the Socket.IO page received Alice's message as {message, from, room, cursor}");

  await alice.screenshot({ path: screenshot });
  step(`screenshot: ${screenshot}`);
}

async function chatState(browser) {
  const room = "state-room";
  const side = "state-side";
  const ada = await open(browser, "Ada", room);
  const ben = await open(browser, "Ben", room);
  // Ben is in #state-side too (empty so far), but looks at #state-room.
  await joinRoom(ben, side);
  await ben.locator(`#rooms li[data-room="${room}"]`).click();
  await ben.locator(`#rooms li.active[data-room="${room}"]`).waitFor();
  step(`Ada and Ben joined #${room}; Ben also #${side}`);

  await say(ada, "helo wrld");
  await say(ada, "this one goes away");
  await message(ben, "this one goes away").waitFor();
  const id1 = await message(ada, "helo wrld").locator("xpath=..").getAttribute("data-id");
  const id2 = await message(ada, "this one goes away").locator("xpath=..").getAttribute("data-id");
  const msg = (page, id) => page.locator(`#messages .msg[data-id="${id}"]`);

  // Ada edits her first message with the inline editor.
  await msg(ada, id1).hover();
  await msg(ada, id1).locator('button[data-act="edit"]').click();
  const editor = msg(ada, id1).locator(".editor input");
  await editor.waitFor();
  if ((await editor.inputValue()) !== "helo wrld") problems.push(`the editor starts with ${JSON.stringify(await editor.inputValue())}`);
  await editor.fill("hello world");
  await editor.press("Enter");
  const edit = await until(() => sentFrames(ada).find((f) => f.type === "edit"), "Ada's edit frame");
  if (edit.room !== room || edit.id !== id1 || edit.body !== "hello world" || !edit.client_id) {
    problems.push(`Ada's edit went out as ${JSON.stringify(edit)}`);
  }
  await msg(ben, id1).locator(".body", { hasText: "hello world" }).waitFor();
  await msg(ben, id1).locator(".edited").waitFor();
  const benBody = await msg(ben, id1).locator(".body").textContent();
  const benMark = await msg(ben, id1).locator(".edited").textContent();
  if (benBody !== "hello world" || benMark !== "(edited)") {
    problems.push(`Ben sees the edited message as ${JSON.stringify(benBody)} ${JSON.stringify(benMark)}`);
  }
  await msg(ada, id1).locator(".body", { hasText: "hello world" }).waitFor();
  step('Ada edited her message; Ben sees "hello world (edited)"');

  // Ben cannot edit Ada's message: no button, and the server's refusal shows as a toast.
  if ((await msg(ben, id1).locator('button[data-act="edit"]').count()) !== 0) problems.push("Ben is offered to edit Ada's message");
  await ben.evaluate((id) => send({ type: "edit", room: "state-room", id, body: "hacked", client_id: "bad" }), id1);
  await ben.locator("#toast.show", { hasText: "forbidden" }).waitFor();
  step("an edit of someone else's message shows the forbidden toast");

  // Ben reacts 👍; Ada sees the chip, adds hers with a click on it.
  await msg(ben, id1).hover();
  await msg(ben, id1).locator('button[data-act="react:👍"]').click();
  const adaChip = msg(ada, id1).locator(".reactions .chip");
  await adaChip.filter({ hasText: "👍 1" }).waitFor();
  if ((await adaChip.count()) !== 1 || (await adaChip.textContent()) !== "👍 1") {
    problems.push(`Ada's chips: ${JSON.stringify(await adaChip.allTextContents())}, expected ["👍 1"]`);
  }
  if (await adaChip.evaluate((e) => e.classList.contains("me"))) problems.push("Ada's chip is highlighted though only Ben reacted");
  const benChip = msg(ben, id1).locator(".reactions .chip");
  await benChip.filter({ hasText: "👍 1" }).waitFor();
  if (!(await benChip.evaluate((e) => e.classList.contains("me")))) problems.push("Ben's own reaction chip is not highlighted");
  const react = sentFrames(ben).find((f) => f.type === "react");
  if (!react || react.id !== id1 || react.emoji !== "👍" || react.on !== true || react.room !== room) {
    problems.push(`Ben's reaction went out as ${JSON.stringify(react)}`);
  }
  await adaChip.click();
  await adaChip.filter({ hasText: "👍 2" }).waitFor();
  await benChip.filter({ hasText: "👍 2" }).waitFor();
  step('Ben reacted 👍: Ada sees "👍 1"; her click on the chip makes it "👍 2" on both pages');

  // With the keyboard: Ben focuses 🎉 and presses Enter, then Enter again (the focus stays on
  // the button when the message is redrawn): Ada's chip comes and goes.
  await msg(ben, id1).locator('button[data-act="react:🎉"]').focus();
  await ben.keyboard.press("Enter");
  await adaChip.filter({ hasText: "🎉 1" }).waitFor();
  await msg(ben, id1).locator(".chip", { hasText: "🎉 1" }).waitFor();
  const focused = await ben.evaluate(() => document.activeElement?.dataset?.act ?? null);
  if (focused !== "react:🎉") problems.push(`after the reaction Ben's focus is on ${JSON.stringify(focused)}`);
  await ben.keyboard.press("Enter");
  await adaChip.filter({ hasText: "🎉" }).waitFor({ state: "detached" });
  const off = sentFrames(ben).filter((f) => f.type === "react" && f.emoji === "🎉").map((f) => f.on);
  if (JSON.stringify(off) !== "[true,false]") problems.push(`Ben's 🎉 frames had on = ${JSON.stringify(off)}`);
  step("with the keyboard Ben added 🎉 and took it back (on: true, then false)");

  // Ada deletes her second message (the page asks first, inline).
  await msg(ada, id2).hover();
  await msg(ada, id2).locator('button[data-act="delete"]').click();
  await msg(ada, id2).locator('button[data-act="confirm"]').click();
  const tomb = msg(ben, id2).locator(".tombstone");
  await tomb.waitFor();
  if ((await tomb.textContent()) !== "message deleted") problems.push(`Ben's tombstone reads ${JSON.stringify(await tomb.textContent())}`);
  for (const part of [".body", ".actions", ".reactions"]) {
    if ((await msg(ben, id2).locator(part).count()) !== 0) problems.push(`Ben's tombstone still has ${part}`);
  }
  if (!sentFrames(ada).find((f) => f.type === "delete" && f.id === id2 && f.room === room)) problems.push("Ada sent no delete frame");
  step("Ada deleted a message: Ben sees a tombstone");

  // A reload renders the same from `history`.
  await ben.reload();
  await ben.locator("#status.online").waitFor();
  await ben.locator(`#rooms li.active[data-room="${room}"]`).waitFor();
  await msg(ben, id2).locator(".tombstone").waitFor();
  const after = {
    body: await msg(ben, id1).locator(".body").textContent(),
    edited: await msg(ben, id1).locator(".edited").count(),
    chips: await msg(ben, id1).locator(".chip").allTextContents(),
    me: await msg(ben, id1).locator(".chip.me").count(),
    body2: await msg(ben, id2).locator(".body").count(),
  };
  if (JSON.stringify(after) !== JSON.stringify({ body: "hello world", edited: 1, chips: ["👍 2"], me: 1, body2: 0 })) {
    problems.push(`after a reload Ben's page shows ${JSON.stringify(after)}`);
  }
  step("after a reload Ben's page shows the same state from history");

  // Read while looking: a burst of messages gives at most one `read` a second, the last one
  // at the newest message.
  const burst = Array.from({ length: 5 }, (_, i) => `burst ${i + 1}`);
  const readsBefore = sentFrames(ben).length;
  await ada.evaluate((bodies) => {
    for (const body of bodies) send({ type: "send", room: "state-room", body });
  }, burst);
  await message(ben, "burst 5").waitFor();
  const last = await until(() => receivedFrames(ben).find((f) => f.type === "message" && f.body === "burst 5"), "burst 5");
  await until(() => sentFrames(ben).slice(readsBefore).find((f) => f.type === "read" && f.cursor === last.cursor), "Ben's read of the burst");
  const reads = [];
  frames.get(ben).sent.forEach((f, i) => {
    if (i >= readsBefore && f.type === "read" && f.room === room) reads.push(frames.get(ben).sentAt[i]);
  });
  for (let i = 1; i < reads.length; i++) {
    if (reads[i] - reads[i - 1] < 900) problems.push(`Ben sent two reads of #${room} ${reads[i] - reads[i - 1]} ms apart`);
  }
  if (reads.length > 3) problems.push(`Ben sent ${reads.length} reads for a burst of 5 messages`);
  step(`a burst of 5 messages: Ben's page sent ${reads.length} read(s), the last at the newest message`);

  // Unread: Ada writes twice in #state-side, which Ben is not looking at.
  await joinRoom(ada, side);
  await say(ada, "side one");
  await say(ada, "side two");
  const benSide = ben.locator(`#rooms li[data-room="${side}"]`);
  await benSide.locator(".badge", { hasText: "2" }).waitFor();
  step(`Ben's badge for #${side} shows 2`);

  // Ada writes to Ben directly.
  await ada.locator("#online li.user").filter({ hasText: /^Ben$/ }).click();
  await ada.locator('#rooms li.dm.active[data-dm="Ben"]').waitFor();
  await ada.locator("#text:not([disabled])").waitFor();
  await say(ada, "psst ben");
  await ben.locator('#rooms li.dm[data-dm="Ada"] .preview', { hasText: "psst ben" }).waitFor();

  // Ben's second page (another device: the same user, fresh storage but these two rooms).
  const ben2 = await newPage(browser, "Ben (2)", {
    "chatbus.name": "Ben",
    "chatbus.rooms": JSON.stringify([room, side]),
    "chatbus.current": room,
  });
  await ben2.goto(url);
  await ben2.locator("#status.online").waitFor();
  const ben2Side = ben2.locator(`#rooms li[data-room="${side}"]`);
  await ben2Side.locator(".badge", { hasText: "2" }).waitFor();
  const joinedSide = receivedFrames(ben2).find((f) => f.type === "joined" && f.room === side);
  if (!joinedSide || joinedSide.unread !== 2) problems.push(`Ben's second page joined #${side} with ${JSON.stringify(joinedSide)}`);
  step(`Ben's second page shows 2 unread in #${side} (joined.unread)`);

  // The conversation list: Ada's direct conversation, never opened on this page.
  const conv = await until(() => sentFrames(ben2).find((f) => f.type === "conversations"), "the conversations request");
  if (conv.limit !== 50) problems.push(`conversations asked as ${JSON.stringify(conv)}`);
  const dm2 = ben2.locator('#rooms li.dm[data-dm="Ada"]');
  await dm2.locator(".preview", { hasText: "psst ben" }).waitFor();
  const dmBadge = await dm2.locator(".badge").textContent().catch(() => null);
  if (dmBadge !== "1") problems.push(`Ben's second page: the conversation with Ada has badge ${JSON.stringify(dmBadge)}, expected "1"`);
  step("the conversation list shows Ada's direct conversation on Ben's second page, 1 unread");

  // Ben opens #state-side on his first page: it is read, and the second page's badge clears.
  await benSide.click();
  await message(ben, "side two").waitFor();
  const sideTwo = receivedFrames(ben).find((f) => f.type === "message" && f.body === "side two");
  const read = await until(() => sentFrames(ben).find((f) => f.type === "read" && f.room === side), "Ben's read frame");
  if (!sideTwo || read.cursor !== sideTwo.cursor) problems.push(`Ben read up to ${read.cursor}, the newest message is at ${sideTwo?.cursor}`);
  await ben2Side.locator(".badge").waitFor({ state: "detached" });
  const got = receivedFrames(ben2).find((f) => f.type === "read" && f.room === side && f.user === "Ben");
  if (!got) problems.push("Ben's second page received no read frame");
  step(`Ben read #${side} on one page (cursor ${read.cursor}); the other page's badge cleared`);

  // Opening the listed conversation joins it and shows its history.
  await dm2.click();
  await ben2.locator("#room-title", { hasText: "@Ada" }).waitFor();
  await message(ben2, "psst ben").waitFor();
  if (!sentFrames(ben2).find((f) => f.type === "join" && String(f.room).startsWith("dm."))) problems.push("Ben's second page did not join the conversation");
  step("Ben's second page opened the conversation: Ada's message shows");

  await ben.locator(`#rooms li[data-room="${room}"]`).click();
  await msg(ben, id1).hover();
  await ben.screenshot({ path: screenshot });
  step(`screenshot: ${screenshot}`);
}

let browser;
let ok = false;
try {
  browser = await chromium.launch({

    executablePath: "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-quic",
      "--no-first-run",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  step(`${testName}: chromium ${browser.version()}`);
  await TESTS[testName](browser);
  ok = problems.length === 0;
} catch (e) {
  problems.push(String(e && e.stack ? e.stack : e));
} finally {
  if (browser) await browser.close().catch(() => {});
  clearTimeout(watchdog);
}

for (const p of problems) console.error(`  FAIL ${p}`);
process.exit(ok ? 0 : 1);
