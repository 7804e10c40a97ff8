//! A control-socket request line, as any local client may send it: the daemon decodes each
//! line with `serde_json::from_slice::<Request>` before anything else looks at it. Errors
//! are fine (the client gets `{"ok":false,...}`); a panic is a bug. Kept to the one call so
//! it follows `Request` wherever it lives.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xvdpa::api::Request;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<Request>(data) {
        // What decodes must encode again.
        serde_json::to_vec(&req).expect("a decoded request encodes");
        // An add-port request's fields then go through the same checks as a `[[port]]`.
        if let Request::AddPort(fields) = req {
            let _ = fields.into_spec();
        }
    }
});
