//! Arbitrary bytes as an API request: the first byte picks the method, the bytes up to the
//! first newline are the path, the rest is the body. Routing and JSON decoding must give a
//! request or a 400 with a message, never panic; an accepted body re-encodes as JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;

// Each input on a thread under the `api` filter, the API thread's.
fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    ember_fuzz::filtered("api").run(move || parse(&data));
});

fn parse(data: &[u8]) {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let method = ["GET", "PUT", "PATCH", "DELETE"][usize::from(m % 4)];
    let (path, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(path) = std::str::from_utf8(path) else {
        return;
    };
    match ember_api::parse(method, path, body) {
        Ok(req) => {
            let (group, name) = req.metric();
            assert!(!group.is_empty() && !name.is_empty());
        }
        Err(e) => {
            let r: ember_api::ApiResponse = e.into();
            assert_eq!(r.status, 400);
            let body = r.body.expect("a 400 has a body");
            let v: serde_json::Value = serde_json::from_str(&body).expect("the body is JSON");
            assert!(v["fault_message"].is_string());
        }
    }
    // The config-file format too.
    if let Ok(cfg) = serde_json::from_slice::<ember_api::model::FullVmConfiguration>(body) {
        let text = serde_json::to_string(&cfg).expect("re-encodes");
        let again: ember_api::model::FullVmConfiguration =
            serde_json::from_str(&text).expect("round-trips");
        assert_eq!(again, cfg);
    }
}
