// Scenarios of the Socket.IO endpoint with the official socket.io-client, run by
// tests/socketio.rs (which starts redis-server, Tansu and the chat-server instances through
// chatbus-testkit and passes their addresses here):
//
//   node tests/socketio/scenarios.mjs <scenario>
//
// Environment: URLS (comma-separated http://127.0.0.1:PORT of the instances), TOKENS (JSON
// {user: JWT}). Prints one line per check and "PASS <scenario>" at the end; exits non-zero
// with "FAIL <scenario>: <why>" on the first broken expectation or after a timeout.
import { io } from 'socket.io-client';

const URLS = (process.env.URLS || '').split(',').filter(Boolean);
const TOKENS = JSON.parse(process.env.TOKENS || '{}');
for (const u of URLS) if (!/^http:\/\/127\.0\.0\.1:\d+$/.test(u)) throw new Error(`non-loopback URL ${u}`);
// How long anything that must happen may take (across instances, through the broker).
const WAIT_MS = 10_000;

const sockets = [];
function connect(url, user, opts = {}) {
  const { cursors, ...rest } = opts;
  const auth = { token: TOKENS[user] };
  if (cursors) auth.cursors = cursors;
  const s = io(url, { reconnection: false, forceNew: true, auth, ...rest });
  sockets.push(s);
  s.label = `${user}@${url.split(':').pop()}`;
  // Every `message` event, in arrival order.
  s.got = [];
  s.on('message', (m) => s.got.push(m));
  return s;
}
function connected(s) {
  return new Promise((resolve, reject) => {
    if (s.connected) return resolve(s);
    s.once('connect', () => resolve(s));
    s.once('connect_error', (e) => reject(new Error(`${s.label}: connect_error ${e.message}`)));
  });
}
function check(cond, what) {
  if (!cond) throw new Error(what);
  console.log(`ok - ${what}`);
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
// Waits until pred() holds, polling; throws naming `what` after WAIT_MS.
async function until(what, pred) {
  const end = Date.now() + WAIT_MS;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}
const bodies = (s, prefix) => s.got.filter((m) => typeof m.message === 'string' && m.message.startsWith(prefix)).map((m) => m.message);
const tag = `${process.pid}-${Date.now()}`;

const scenarios = {
  // The seed's exact calls: emit('event:message', {message}) and the bare string the Node
  // peer's clients send, on('message') reading m.message; clients on both instances, each
  // gets every message once.
  async seed() {
    const clients = [];
    for (let i = 0; i < 6; i++) clients.push(connect(URLS[i % URLS.length], `u${i}`));
    await Promise.all(clients.map(connected));
    // Joined at connect: the default room's presence must have settled before the sends, or
    // an instance that subscribes late would miss them; a round trip through every
    // instance proves it.
    await settle(clients);
    const sent = [];
    clients[0].emit('event:message', { message: `seed:${tag}:object` });
    sent.push(`seed:${tag}:object`);
    clients[1].emit('event:message', `seed:${tag}:string`);
    sent.push(`seed:${tag}:string`);
    for (let k = 0; k < 5; k++) {
      const body = `seed:${tag}:burst-${k}`;
      clients[k % 2].emit('event:message', body);
      sent.push(body);
    }
    await until('every client to get every seed message', () => clients.every((c) => bodies(c, `seed:${tag}:`).length >= sent.length));
    await sleep(300); // a duplicate would come right after
    for (const c of clients) {
      const got = bodies(c, `seed:${tag}:`);
      check(got.length === sent.length && new Set(got).size === sent.length, `${c.label} got each of the ${sent.length} seed messages once`);
    }
    const m = clients[5].got.find((x) => x.message === `seed:${tag}:object`);
    check(m && m.room === 'general' && m.from === 'u0' && typeof m.id === 'string' && typeof m.ts === 'number', 'a message carries room, from, id and ts next to message');
    // One order for everybody.
    const order = (c) => bodies(c, `seed:${tag}:`).join('|');
    check(clients.every((c) => order(c) === order(clients[0])), 'every client saw the messages in one order');
  },

  // Long-polling only, and the default (polling, then upgraded to WebSocket): both chat.
  async transports() {
    const polling = connect(URLS[0], 'poller', { transports: ['polling'] });
    const upgrading = connect(URLS[1 % URLS.length], 'upgrader');
    const upgraded = new Promise((resolve) => {
      upgrading.io.on('open', () => upgrading.io.engine.once('upgrade', (t) => resolve(t.name)));
    });
    await Promise.all([connected(polling), connected(upgrading)]);
    check((await Promise.race([upgraded, sleep(WAIT_MS).then(() => 'none')])) === 'websocket', 'the default client upgraded to websocket');
    await settle([polling, upgrading]);
    polling.emit('event:message', `tr:${tag}:from-polling`);
    upgrading.emit('event:message', `tr:${tag}:from-websocket`);
    for (const s of [polling, upgrading]) {
      await until(`${s.label} to get both`, () => bodies(s, `tr:${tag}:`).length >= 2);
    }
    check(polling.io.engine.transport.name === 'polling', 'the polling-only client is still on polling');
    check(bodies(polling, `tr:${tag}:`).length === 2 && bodies(upgrading, `tr:${tag}:`).length === 2, 'both got both messages once');
  },

  // Acks: send answers {id, cursor} equal to the message's; the same key again is the
  // original's ack marked duplicate; join/leave/history/refresh answers; errors are
  // {code, message} with protocol v1 codes.
  async acks() {
    const s = connect(URLS[0], 'acker');
    await connected(s);
    const body = `ack:${tag}`;
    const ack = await s.timeout(WAIT_MS).emitWithAck('send', { room: 'general', body, key: `k-${tag}` });
    check(typeof ack.id === 'string' && typeof ack.cursor === 'string' && ack.code === undefined, `send acked with id and cursor (${JSON.stringify(ack)})`);
    await until('the acked message', () => s.got.some((m) => m.message === body));
    const m = s.got.find((x) => x.message === body);
    check(m.id === ack.id && m.cursor === ack.cursor, 'the ack names the message (same id and cursor)');
    const again = await s.timeout(WAIT_MS).emitWithAck('send', { room: 'general', body, key: `k-${tag}`, retry: true });
    check(again.duplicate === true && again.id === ack.id && again.cursor === ack.cursor, 'a retry with the same key gets the original ack, duplicate');
    const seedAck = await s.timeout(WAIT_MS).emitWithAck('event:message', { message: `ack:${tag}:seed` });
    check(typeof seedAck.id === 'string', 'event:message with a callback is acked too');
    const notJoined = await s.timeout(WAIT_MS).emitWithAck('send', { room: `other-${process.pid}`, body: 'x' });
    check(notJoined.code === 'not_joined' && typeof notJoined.message === 'string', 'send to a room not joined: {code: not_joined}');
    const badRoom = await s.timeout(WAIT_MS).emitWithAck('join', 'not a room');
    check(badRoom.code === 'bad_request', 'join of an invalid room: {code: bad_request}');
    const joined = await s.timeout(WAIT_MS).emitWithAck('join', { room: `other-${process.pid}` });
    check(joined.room === `other-${process.pid}` && joined.code === undefined, 'join acked with the room');
    const sent = await s.timeout(WAIT_MS).emitWithAck('send', { room: `other-${process.pid}`, body: 'in other' });
    check(typeof sent.id === 'string', 'send to the joined room acked');
    const left = await s.timeout(WAIT_MS).emitWithAck('leave', `other-${process.pid}`);
    check(left.room === `other-${process.pid}`, 'leave acked');
    const history = await s.timeout(WAIT_MS).emitWithAck('history', { room: 'general', limit: 10 });
    check(Array.isArray(history.messages) && history.messages.some((x) => x.message === body && x.id === ack.id), 'history holds the message, with message for body');
    const refreshed = await s.timeout(WAIT_MS).emitWithAck('refresh', { token: TOKENS.acker });
    check(typeof refreshed.expires === 'number' && refreshed.expires > Date.now(), `refresh with a new token of the same user: {expires} (${JSON.stringify(refreshed)})`);
    const stolen = await s.timeout(WAIT_MS).emitWithAck('refresh', TOKENS.u0);
    check(stolen.code === 'unauthorized' && s.connected, 'refresh with another user\'s token: {code: unauthorized}, still connected');
    const unknown = await s.timeout(WAIT_MS).emitWithAck('frobnicate', {});
    check(unknown.code === 'bad_request', 'an unknown event: {code: bad_request}');
    // Without a callback, an error comes as the `error` event.
    const errorEvent = new Promise((resolve) => s.once('error', resolve));
    s.emit('send', { room: 'general' });
    const e = await Promise.race([errorEvent, sleep(WAIT_MS).then(() => ({}))]);
    check(e.code === 'bad_request', 'an error without a callback is the error event');
  },

  // Chat state over Socket.IO, across two instances: only the author edits; the edit and a
  // reaction reach both sockets as `edit` (with `message` for the body) and `reaction`;
  // history shows the state; read is acked; conversations list the room.
  async state() {
    const a = connect(URLS[0], 'u0');
    const b = connect(URLS[1 % URLS.length], 'u1');
    const events = (s) => { s.ev = []; for (const t of ['edit', 'reaction']) s.on(t, (d) => s.ev.push({ t, ...d })); };
    events(a); events(b);
    await Promise.all([connected(a), connected(b)]);
    await settle([a, b]);
    const body = `st:${tag}:helo`;
    const ack = await a.timeout(WAIT_MS).emitWithAck('send', { room: 'general', body });
    check(typeof ack.id === 'string', 'the message is acked');
    await until('both to get the message', () => [a, b].every((s) => bodies(s, body).length === 1));
    const forbidden = await b.timeout(WAIT_MS).emitWithAck('edit', { room: 'general', id: ack.id, body: 'hacked' });
    check(forbidden.code === 'forbidden', `an edit by another user: {code: forbidden} (${JSON.stringify(forbidden)})`);
    const missing = await b.timeout(WAIT_MS).emitWithAck('react', { room: 'general', id: '01a00000-0000-7000-8000-000000000000', emoji: '👍', on: true });
    check(missing.code === 'not_found', 'a reaction to an unknown message: {code: not_found}');
    const edited = await a.timeout(WAIT_MS).emitWithAck('edit', { room: 'general', id: ack.id, body: `st:${tag}:hello` });
    check(typeof edited.id === 'string' && edited.code === undefined, 'the author\'s edit is acked');
    const reacted = await b.timeout(WAIT_MS).emitWithAck('react', { room: 'general', id: ack.id, emoji: '👍', on: true });
    check(reacted.code === undefined, 'the reaction is acked');
    for (const s of [a, b]) {
      await until(`${s.label} to get the edit and the reaction`, () => s.ev.length >= 2);
      await sleep(200);
      check(s.ev.length === 2 && s.ev[0].t === 'edit' && s.ev[0].message === `st:${tag}:hello` && s.ev[0].id === ack.id, `${s.label} got the edit once, body as message`);
      check(s.ev[1].t === 'reaction' && s.ev[1].user === 'u1' && s.ev[1].emoji === '👍' && s.ev[1].on === true, `${s.label} got the reaction once`);
    }
    const history = await a.timeout(WAIT_MS).emitWithAck('history', { room: 'general', limit: 50 });
    const item = (history.messages || []).find((m) => m.id === ack.id);
    check(item && item.message === `st:${tag}:hello` && typeof item.edited === 'number', 'history shows the edited text');
    check(item && Array.isArray(item.reactions) && item.reactions[0].emoji === '👍' && item.reactions[0].count === 1, 'history shows the reaction count');
    const read = await b.timeout(WAIT_MS).emitWithAck('read', { room: 'general', cursor: item.cursor });
    check(read.code === undefined, `read is acked (${JSON.stringify(read)})`);
    const list = await b.timeout(WAIT_MS).emitWithAck('conversations', { limit: 10 });
    check(Array.isArray(list.conversations) && list.conversations.some((c) => c.room === 'general'), 'conversations list the room');
    // members pages who is online, across both instances, in order.
    let page = {};
    for (const end = Date.now() + WAIT_MS; Date.now() < end; await sleep(50)) {
      page = await a.timeout(WAIT_MS).emitWithAck('members', { room: 'general', limit: 1000 });
      if (Array.isArray(page.users) && ['u0', 'u1'].every((u) => page.users.includes(u))) break;
    }
    check(['u0', 'u1'].every((u) => (page.users || []).includes(u)), `members lists both users (${JSON.stringify(page)})`);
    const first = await a.timeout(WAIT_MS).emitWithAck('members', { room: 'general', limit: 1 });
    check(first.users.length === 1 && typeof first.next === 'string', `a page of one with next (${JSON.stringify(first)})`);
    const second = await a.timeout(WAIT_MS).emitWithAck('members', { room: 'general', after: first.next, limit: 1 });
    check(second.users.length === 1 && second.users[0] > first.users[0], `the next page follows in order (${JSON.stringify(second)})`);
    const notJoined = await a.timeout(WAIT_MS).emitWithAck('members', { room: `nowhere-${process.pid}` });
    check(notJoined.code === 'not_joined', 'members of a room not joined: {code: not_joined}');
  },

  // A client disconnected for 5 s reconnects (to the other instance) with the last cursor it
  // had and gets every message it missed once, in order, then live ones.
  async resume() {
    const sender = connect(URLS[0], 'sender');
    let reader = connect(URLS[0], 'reader');
    await Promise.all([connected(sender), connected(reader)]);
    await settle([sender, reader]);
    sender.emit('event:message', `res:${tag}:before`);
    await until('the message before the break', () => bodies(reader, `res:${tag}:`).length === 1);
    const last = reader.got.filter((m) => m.message.startsWith(`res:${tag}:`)).pop();
    check(typeof last.cursor === 'string', `the reader has a cursor (${last.cursor})`);
    reader.close();
    const missed = [];
    const start = Date.now();
    for (let k = 0; Date.now() - start < 5000; k++) {
      const body = `res:${tag}:missed-${k}`;
      const ack = await sender.timeout(WAIT_MS).emitWithAck('event:message', { message: body });
      check(ack.code === undefined, `missed-${k} acked`);
      missed.push(body);
      await sleep(250);
    }
    reader = connect(URLS[1 % URLS.length], 'reader', { cursors: { general: last.cursor } });
    await connected(reader);
    await until('every missed message', () => bodies(reader, `res:${tag}:`).length >= missed.length);
    sender.emit('event:message', `res:${tag}:live`);
    await until('the live message', () => bodies(reader, `res:${tag}:live`).length === 1);
    await sleep(300);
    const got = bodies(reader, `res:${tag}:`);
    check(got.join('|') === [...missed, `res:${tag}:live`].join('|'), `after ${missed.length} messages missed over 5 s: each once, in order, then the live one (got ${got.length})`);
  },

  // A bad token, none, a malformed auth and a foreign Origin are refused at connect with
  // connect_error; a valid token connects.
  async badtoken() {
    for (const [what, auth] of [['a bad signature', { token: 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4IiwiZXhwIjo0MTAyNDQ0ODAwfQ.bad' }], ['no token', {}], ['a malformed auth', 'not an object']]) {
      const s = io(URLS[0], { reconnection: false, forceNew: true, auth });
      sockets.push(s);
      const outcome = await new Promise((resolve) => {
        s.once('connect', () => resolve('connected'));
        s.once('connect_error', (e) => resolve(e.message));
        setTimeout(() => resolve('no answer'), WAIT_MS);
      });
      const want = typeof auth === 'string' ? /^(unauthorized|bad_request): / : /^unauthorized: /;
      check(want.test(outcome) && !s.connected, `${what} is refused at connect (${outcome})`);
    }
    // A valid token from a foreign page is refused by the Origin check, as on /ws.
    const foreign = io(URLS[0], { reconnection: false, forceNew: true, auth: { token: TOKENS.u0 }, extraHeaders: { origin: 'http://evil.example' } });
    sockets.push(foreign);
    const outcome = await new Promise((resolve) => {
      foreign.once('connect', () => resolve('connected'));
      foreign.once('connect_error', (e) => resolve(e.message));
      setTimeout(() => resolve('no answer'), WAIT_MS);
    });
    check(outcome === 'forbidden: origin not allowed', `a foreign Origin is refused (${outcome})`);
    // And the same token from no page at all connects: the refusals above were the auth's.
    const fine = connect(URLS[0], 'u0');
    await connected(fine);
    check(fine.connected, 'a valid token connects');
  },

  // A direct message (`send` with `to`) between Socket.IO users on two instances: acked with
  // the conversation's room, delivered to the recipient (and the sender's own sockets)
  // without joining anything, and not to a third user in the default room.
  async direct() {
    const ann = connect(URLS[0], 'u0');
    const bob = connect(URLS[1 % URLS.length], 'u1');
    const eve = connect(URLS[1 % URLS.length], 'u2');
    await Promise.all([ann, bob, eve].map(connected));
    await settle([ann, bob, eve]);
    const body = `dm:${tag}`;
    const ack = await ann.timeout(WAIT_MS).emitWithAck('send', { to: 'u1', body });
    check(typeof ack.id === 'string' && typeof ack.room === 'string' && ack.room.startsWith('dm.'), `a direct message is acked with its conversation (${JSON.stringify(ack)})`);
    await until('the direct message at bob and ann', () => [ann, bob].every((s) => s.got.some((m) => m.id === ack.id)));
    const m = bob.got.find((x) => x.id === ack.id);
    check(m.message === body && m.from === 'u0' && m.to === 'u1' && m.room === ack.room, 'bob got it with from, to and the conversation as room');
    await sleep(500);
    check(!eve.got.some((x) => x.id === ack.id), 'a third user did not get it');
    const both = await ann.timeout(WAIT_MS).emitWithAck('send', { to: 'u1', room: 'general', body: 'x' });
    check(both.code === 'bad_request', '`room` and `to` together: {code: bad_request}');
  },

  // Tokens that expire 8 s from now (TOKENS.short, user "shorty", inside the verifier's
  // leeway): a socket that refreshes with a long token (TOKENS.shorty) stays; the other gets
  // an `unauthorized` error event and a server disconnect when the token expires.
  async expiry() {
    const start = Date.now();
    const lapsing = connect(URLS[0], 'short');
    const refreshing = connect(URLS[0], 'short');
    await Promise.all([connected(lapsing), connected(refreshing)]);
    const errors = [];
    lapsing.on('error', (e) => errors.push(e));
    const gone = new Promise((resolve) => lapsing.once('disconnect', resolve));
    const r = await refreshing.timeout(WAIT_MS).emitWithAck('refresh', { token: TOKENS.shorty });
    check(r.expires > Date.now() + 3_000_000, `refreshed to a later expiry (${JSON.stringify(r)})`);
    const why = await Promise.race([gone, sleep(WAIT_MS).then(() => 'still connected')]);
    const after = (Date.now() - start) / 1000;
    check(why === 'io server disconnect' && after > 3, `the lapsing socket is disconnected by the server at expiry (${why} after ${after.toFixed(1)} s)`);
    check(errors.some((e) => e.code === 'unauthorized'), 'it was told why: an unauthorized error event');
    await sleep(1500);
    check(refreshing.connected, 'the refreshed socket is still connected past the old expiry');
  },

  // The Rust test stops instance 1 gracefully (SIGTERM) after READY: the client's transport
  // is closed (so a stock client would reconnect by itself, unlike after "io server
  // disconnect"), and on the other instance it resumes with its cursor without a gap.
  async drain() {
    const s = connect(URLS[0], 'reader');
    const sender = connect(URLS[1], 'sender');
    await Promise.all([connected(s), connected(sender)]);
    await settle([s, sender]);
    const first = await sender.timeout(WAIT_MS).emitWithAck('event:message', { message: `drain:${tag}:before` });
    await until('the message before the stop', () => s.got.some((m) => m.id === first.id));
    const cursor = s.got.find((m) => m.id === first.id).cursor;
    const reason = new Promise((resolve) => s.once('disconnect', resolve));
    console.log('READY');
    const why = await Promise.race([reason, sleep(WAIT_MS).then(() => 'still connected')]);
    check(why === 'transport close', `the stopped instance closed the transport (disconnect reason: ${why})`);
    const missed = [];
    for (let k = 0; k < 3; k++) {
      const body = `drain:${tag}:after-${k}`;
      const ack = await sender.timeout(WAIT_MS).emitWithAck('event:message', { message: body });
      check(typeof ack.id === 'string', `after-${k} acked`);
      missed.push(body);
    }
    const again = connect(URLS[1], 'reader', { cursors: { general: cursor } });
    await connected(again);
    await until('the messages sent during the restart', () => bodies(again, `drain:${tag}:after-`).length >= missed.length);
    await sleep(300);
    check(bodies(again, `drain:${tag}:`).join('|') === missed.join('|'), 'resumed on the other instance: each missed message once');
  },

  // With a native client (driven by the Rust test): print READY once joined, answer the
  // native "from-native" message with "from-sio", finish when the native client's second
  // message arrives.
  async interop() {
    const s = connect(URLS[URLS.length - 1], 'sio-user');
    await connected(s);
    await settle([s]);
    console.log('READY');
    await until('the native message', () => s.got.some((m) => m.message === 'from-native' && m.from === 'native-user'));
    const ack = await s.timeout(WAIT_MS).emitWithAck('event:message', { message: 'from-sio' });
    check(typeof ack.id === 'string', 'the Socket.IO send is acked');
    await until('the native client to confirm', () => s.got.some((m) => m.message === 'native-got-it'));
    check(true, 'native and Socket.IO clients see each other');
  },
};

// Every instance subscribed to the default room before a scenario sends: each client sends a
// probe and waits until every client has every probe.
// Until one round of probes (one from each client) reached every client: proof that every
// instance's subscription to the room is up. A round sent while one was still being set up is
// missed for good by it (nothing published before a subscription reaches it), so rounds go on
// until one gets through, within WAIT_MS.
async function settle(clients) {
  const end = Date.now() + WAIT_MS;
  for (let round = 0; Date.now() < end; round++) {
    const probe = `settle:${tag}:${round}:`;
    clients.forEach((c, i) => c.emit('event:message', `${probe}${i}`));
    const roundEnd = Math.min(end, Date.now() + 1000);
    while (Date.now() < roundEnd) {
      if (clients.every((c) => bodies(c, probe).length >= clients.length)) return;
      await sleep(20);
    }
  }
  throw new Error('timed out waiting for the settle probes');
}

const name = process.argv[2];
const scenario = scenarios[name];
if (!scenario) {
  console.error(`unknown scenario ${name}; one of ${Object.keys(scenarios).join(', ')}`);
  process.exit(2);
}
const hard = setTimeout(() => { console.log(`FAIL ${name}: hard timeout`); process.exit(1); }, 60_000);
try {
  await scenario();
  console.log(`PASS ${name}`);
  process.exitCode = 0;
} catch (e) {
  console.log(`FAIL ${name}: ${e.message}`);
  process.exitCode = 1;
} finally {
  clearTimeout(hard);
  for (const s of sockets) s.close();
  setTimeout(() => process.exit(), 200).unref();
}
