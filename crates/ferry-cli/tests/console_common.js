// What the console tests in Chromium share (console_e2e.js, console_stream_e2e.js): their
// settings from the environment, Debian's `chromium` started headless through playwright-core
// in a fresh profile, and the page's script errors collected.
'use strict';
const { chromium } = require('playwright-core');

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};

// A browser context in the profile directory FERRY_PROFILE.
async function launch() {
  return chromium.launchPersistentContext(env('FERRY_PROFILE'), {
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    // The appliance's certificate is self-signed; the Rust side pins it for its own calls.
    ignoreHTTPSErrors: true,
    viewport: { width: 1280, height: 900 },
  });
}

// The page's script errors and console errors, as they come. Refused requests (401, 422) are
// expected and logged by Chromium as failed loads.
function watchProblems(page) {
  const problems = [];
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) problems.push('console: ' + m.text());
  });
  page.on('pageerror', (e) => problems.push('page error: ' + e.message));
  return problems;
}

module.exports = { env, launch, watchProblems };
