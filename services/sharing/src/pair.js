// The box's pairing page: asks to pair this browser, shows the code the box
// made for the request, and waits until the box says paired or refused.
// The token arrives as an HttpOnly cookie: this script never sees it.
"use strict";

(function () {
  const form = document.getElementById("ask");
  const nameInput = document.getElementById("name");
  const button = document.getElementById("pair");
  const codeOut = document.getElementById("code");
  const status = document.getElementById("status");

  function say(text) {
    status.textContent = text;
  }

  function ready(again) {
    button.disabled = !again;
    nameInput.disabled = !again;
  }

  async function post(path, body) {
    const r = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      credentials: "same-origin",
      cache: "no-store",
    });
    let data = {};
    try {
      data = await r.json();
    } catch (e) {
      data = {};
    }
    return { status: r.status, data: data };
  }

  function paired(data) {
    codeOut.textContent = "";
    say(
      "Paired: this browser is \u201c" + (data.name || "") + "\u201d on the box " +
        (data.box_id || "") + ". It may now use the box's services; an owner can " +
        "rename or revoke it with `cloudlet devices`."
    );
  }

  function refused(r) {
    codeOut.textContent = "";
    const why = (r.data && r.data.reason) || "the box answered " + r.status;
    say("Not paired: " + why);
    ready(true);
  }

  function pause(ms) {
    return new Promise(function (done) {
      setTimeout(done, ms);
    });
  }

  async function wait(request) {
    let failures = 0;
    for (;;) {
      let r;
      try {
        r = await post("/pair/browser/wait", { request: request });
      } catch (e) {
        // The network dropped for a moment: ask again, but not forever.
        failures += 1;
        if (failures > 30) {
          refused({ status: 0, data: { reason: "the box cannot be reached any more" } });
          return;
        }
        await pause(1000);
        continue;
      }
      failures = 0;
      if (r.status === 202) {
        continue;
      }
      if (r.status === 200) {
        paired(r.data);
      } else {
        refused(r);
      }
      return;
    }
  }

  form.addEventListener("submit", async function (ev) {
    ev.preventDefault();
    const name = nameInput.value.trim();
    if (!name) {
      say("Give this browser a name first.");
      return;
    }
    ready(false);
    say("Asking the box\u2026");
    let r;
    try {
      r = await post("/pair/browser", { name: name });
    } catch (e) {
      refused({ status: 0, data: { reason: "the box cannot be reached" } });
      return;
    }
    if (r.status === 200) {
      paired(r.data);
      return;
    }
    if (r.status !== 202) {
      refused(r);
      return;
    }
    codeOut.textContent = r.data.code;
    say(
      "Now press the box's button once more. If the box has an owner, the owner types " +
        "this code: cloudlet pairing approve " + r.data.code + ". This box's ID is " +
        r.data.box_id + ": it should match the one `cloudlet pair` printed or the box's console shows."
    );
    await wait(r.data.request);
  });
})();
