// Drives the chat page in headless Debian Chromium: two people chat, the typing indicator
// shows, an XSS payload renders as text (and no alert fires), and a dropped connection
// resumes without losing a message. Usage: node chat.test.mjs <server-url> <screenshot.png>
//
// Every wait is bounded; the whole run is capped by a watchdog. Exit code 0 = passed.

import { chromium } from "playwright-core";

const [url, screenshot] = process.argv.slice(2);
if (!url || !screenshot) {
  console.error("usage: node chat.test.mjs <server-url> <screenshot.png>");
  process.exit(2);
}

const WAIT = 10_000;
const watchdog = setTimeout(() => {
  console.error("browser test: timed out after 90 s");
  process.exit(1);
}, 90_000);

const XSS = "<img src=x onerror=alert(1)>";
const ROOM = "browser-test";
const problems = [];

function step(text) {
  console.log(`  - ${text}`);
}

async function open(browser, name) {
  // One context per person: separate localStorage, like two browsers.
  const context = await browser.newContext({ viewport: { width: 1180, height: 720 } });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.on("dialog", async (d) => {
    problems.push(`${name}: a ${d.type()} dialog fired: ${d.message()}`);
    await d.dismiss();
  });
  page.on("pageerror", (e) => problems.push(`${name}: page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`${name}: console error: ${m.text()}`);
  });
  await page.goto(url);
  await page.locator("#name-input").fill(name);
  await page.locator("#name-form button[type=submit]").click();
  await page.locator("#status.online").waitFor();
  await page.locator("#join-input").fill(ROOM);
  await page.locator("#join-input").press("Enter");
  await page.locator(`#rooms li.active[data-room="${ROOM}"]`).waitFor();
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
  step(`chromium ${browser.version()}`);

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

  ok = problems.length === 0;
} catch (e) {
  problems.push(String(e && e.stack ? e.stack : e));
} finally {
  if (browser) await browser.close().catch(() => {});
  clearTimeout(watchdog);
}

for (const p of problems) console.error(`  FAIL ${p}`);
process.exit(ok ? 0 : 1);
