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

request_movie(key avatar)
{
    string body = "terminal=" + TERMINAL_ID
        + "&asset=" + ASSET_ID
        + "&avatar=" + (string)avatar
        + "&ts=" + (string)llGetUnixTime()
        + "&nonce=" + (string)llGenerateKey();
    string signature = llHMAC(TERMINAL_SECRET, body, "sha256");
    pending = llHTTPRequest(MANAGER_URL + "/api/v1/terminal/play",
        [HTTP_METHOD, "POST",
         HTTP_MIMETYPE, "application/x-www-form-urlencoded",
         HTTP_CUSTOM_HEADER, "X-Terminal-Signature", signature,
         HTTP_BODY_MAXLENGTH, 4096],
        body);
}

default
{
    touch_start(integer n)
    {
        request_movie(llDetectedKey(0));
    }

    http_response(key id, integer status, list meta, string body)
    {
        if (id != pending) return;
        if (status != 200) {
            string message = llJsonGetValue(body, ["error", "message"]);
            if (message == JSON_INVALID) message = "HTTP " + (string)status;
            llOwnerSay("slmedia: " + message);
            return;
        }
        string url = llJsonGetValue(body, ["media_url"]);
        llSetPrimMediaParams(FACE,
            [PRIM_MEDIA_CURRENT_URL, url,
             PRIM_MEDIA_HOME_URL, url,
             PRIM_MEDIA_AUTO_PLAY, TRUE,
             PRIM_MEDIA_AUTO_SCALE, TRUE,
             PRIM_MEDIA_CONTROLS, PRIM_MEDIA_CONTROLS_MINI,
             PRIM_MEDIA_PERMS_INTERACT, PRIM_MEDIA_PERM_ANYONE]);
    }
}
