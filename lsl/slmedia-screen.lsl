// slmedia screen: touch to play a movie on this prim's face.
//
// Set-up (see docs/terminal.md): register a terminal on the web site
// (Terminals page), paste the four values it shows below, and put this
// script in the prim that shows the movie. The secret signs every request so
// nobody else can ask the manager for media URLs in this terminal's name:
// keep the script no-modify for anyone but you.

string MANAGER_URL = "__MANAGER_URL__";
string TERMINAL_ID = "__TERMINAL_ID__";
string TERMINAL_SECRET = "__TERMINAL_SECRET__";
string ASSET_ID = "__ASSET_ID__";
integer FACE = 0;

key pending;
// Paid movies (docs/credits.md): who touched, the purchase's request id
// (kept for a retry, so a retried purchase is charged once), a chat listener
// for the avatar's link code.
key viewer;
string buy_request;
integer buy_retries;
integer listener;

send(string path, string fields)
{
    string body = "terminal=" + TERMINAL_ID + fields
        + "&ts=" + (string)llGetUnixTime()
        + "&nonce=" + (string)llGenerateKey();
    string signature = llHMAC(TERMINAL_SECRET, body, "sha256");
    pending = llHTTPRequest(MANAGER_URL + path,
        [HTTP_METHOD, "POST",
         HTTP_MIMETYPE, "application/x-www-form-urlencoded",
         HTTP_CUSTOM_HEADER, "X-Terminal-Signature", signature,
         HTTP_BODY_MAXLENGTH, 4096],
        body);
}

request_movie(key avatar)
{
    viewer = avatar;
    send("/api/v1/terminal/play", "&asset=" + ASSET_ID + "&avatar=" + (string)avatar);
}

buy()
{
    send("/api/v1/terminal/buy", "&asset=" + ASSET_ID + "&avatar=" + (string)viewer
        + "&request=" + buy_request);
}

default
{
    touch_start(integer n)
    {
        request_movie(llDetectedKey(0));
    }

    listen(integer channel, string name, key id, string message)
    {
        llListenRemove(listener);
        llSetTimerEvent(0.0);
        send("/api/v1/terminal/link", "&avatar=" + (string)viewer
            + "&code=" + llStringTrim(message, STRING_TRIM));
    }

    timer()
    {
        llListenRemove(listener);
        llSetTimerEvent(0.0);
    }

    http_response(key id, integer status, list meta, string body)
    {
        if (id != pending) return;
        string code = llJsonGetValue(body, ["error", "code"]);
        if (code == "payment_required") {
            buy_request = (string)llGenerateKey();
            buy_retries = 0;
            buy();
            return;
        }
        if (code == "avatar_not_linked") {
            llRegionSayTo(viewer, 0, "This movie has a price. Say the link code from your account page on the web site (within 60 seconds).");
            llListenRemove(listener);
            listener = llListen(0, "", viewer, "");
            llSetTimerEvent(60.0);
            return;
        }
        if (llJsonGetValue(body, ["linked"]) == JSON_TRUE) {
            buy();
            return;
        }
        // No answer or a server error: retry the same purchase once.
        if ((status == 499 || status >= 500) && buy_request != "" && buy_retries < 1) {
            buy_retries += 1;
            buy();
            return;
        }
        if (status != 200) {
            string message = llJsonGetValue(body, ["error", "message"]);
            if (message == JSON_INVALID) message = "HTTP " + (string)status;
            llOwnerSay("slmedia: " + message);
            return;
        }
        string url = llJsonGetValue(body, ["media_url"]);
        buy_request = "";
        llSetPrimMediaParams(FACE,
            [PRIM_MEDIA_CURRENT_URL, url,
             PRIM_MEDIA_HOME_URL, url,
             PRIM_MEDIA_AUTO_PLAY, TRUE,
             PRIM_MEDIA_AUTO_SCALE, TRUE,
             PRIM_MEDIA_CONTROLS, PRIM_MEDIA_CONTROLS_MINI,
             PRIM_MEDIA_PERMS_INTERACT, PRIM_MEDIA_PERM_ANYONE]);
    }
}
