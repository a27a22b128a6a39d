// The npm `nacos` client (2.6.x: HTTP v1 plus UDP push) against a running
// Roster node: register, subscribe (UDP push), list, server status,
// deregister. Usage: node nacos_naming.js HTTP_PORT. Exits non-zero on failure.
'use strict';

const assert = require('assert');
const { NacosNamingClient } = require('nacos');

const WAIT_MS = 20000;
const SERVICE = 'node-orders';
const quiet = { info() {}, debug() {}, warn: console.warn, error: console.error };

function addresses(hosts) {
  return hosts.map(h => `${h.ip}:${h.port}`).sort().join(',');
}

async function main(httpPort) {
  const client = new NacosNamingClient({
    logger: quiet,
    serverList: `127.0.0.1:${httpPort}`,
    namespace: 'public',
  });
  await client.ready();

  const seen = [];
  const waiters = [];
  client.subscribe(SERVICE, hosts => {
    seen.push(addresses(hosts));
    for (const w of waiters.splice(0)) w();
  });
  // Resolves once a push (or poll) delivered exactly `wanted`.
  async function delivered(wanted) {
    const deadline = Date.now() + WAIT_MS;
    while (!seen.includes(wanted)) {
      assert(Date.now() < deadline, `never delivered ${wanted}; saw ${JSON.stringify(seen)}`);
      await new Promise(r => { waiters.push(r); setTimeout(r, 100); });
    }
  }

  await client.registerInstance(SERVICE, { ip: '10.3.0.1', port: 80, metadata: { lang: 'node' } });
  await delivered('10.3.0.1:80');
  await client.registerInstance(SERVICE, { ip: '10.3.0.2', port: 80 });
  await delivered('10.3.0.1:80,10.3.0.2:80');

  const all = await client.getAllInstances(SERVICE);
  assert.strictEqual(addresses(all), '10.3.0.1:80,10.3.0.2:80');
  const first = all.find(h => h.ip === '10.3.0.1');
  assert.strictEqual(first.metadata.lang, 'node');
  assert.strictEqual(await client.getServerStatus(), 'UP');

  // The client polls every 10 s; seeing this within the wait below and
  // well before then is the UDP push.
  const before = Date.now();
  await client.deregisterInstance(SERVICE, { ip: '10.3.0.1', port: 80 });
  await delivered('10.3.0.2:80');
  assert(Date.now() - before < 5000, 'the removal came by UDP push, not by the next poll');

  client.close();
  console.log('node nacos client: ok');
}

main(Number(process.argv[2])).then(
  () => process.exit(0),
  e => { console.error('FAIL', e); process.exit(1); },
);
