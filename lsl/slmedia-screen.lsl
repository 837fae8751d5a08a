// slmedia screen: touch to play a movie on this prim's face.
//
// Set-up (see docs/terminal.md): register a terminal on the web site
// (Terminals page), paste the four values it shows below, and put this
// script in the prim that shows the movie. The secret signs every request so
// nobody else can ask the manager for media URLs in this terminal's name:
// keep the script no-modify for anyone but you.
//
// A free movie plays as the face's prim media, seen by everyone nearby. A
// paid movie plays through parcel media for its buyer alone, which needs
// this object to belong to the parcel's owner (or be deeded to the group
// that owns the parcel) and a media texture set in About Land > Media.

string MANAGER_URL = "__MANAGER_URL__";
string TERMINAL_ID = "__TERMINAL_ID__";
string TERMINAL_SECRET = "__TERMINAL_SECRET__";
string ASSET_ID = "__ASSET_ID__";
integer FACE = 0;
integer MAX_BUYERS = 8;

key pending = NULL_KEY; // a global key starts as "", not NULL_KEY
integer step; // what `pending` asks: 0 play, 1 buy, 2 link
// Who touched, the purchase's request id (kept for a retry, so a retried
// purchase is charged once), the listener for the avatar's link code.
key viewer;
string buy_request;
integer buy_retries;
integer listener;
// Paid views (docs/credits.md): [avatar, media URL, expires_at, playing],
// one stride per buyer, so a buyer's touch stops or restarts their own view
// without buying again. `shared`: the face holds a free movie's prim media.
list buyers;
key media_texture;
integer shared;

tell(string message)
{
    llRegionSayTo(viewer, 0, message);
}

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
    if (pending == NULL_KEY) tell("The screen is busy; touch it again in a moment.");
}

buy()
{
    step = 1;
    send("/api/v1/terminal/buy", "&asset=" + ASSET_ID + "&avatar=" + (string)viewer
        + "&request=" + buy_request);
}

key parcel(vector at)
{
    return llList2Key(llGetParcelDetails(at, [PARCEL_DETAILS_ID]), 0);
}

integer refuse(string why)
{
    llOwnerSay("slmedia: paid movies cannot play here: " + why + " (docs/terminal.md).");
    tell("This screen cannot play paid movies here; its owner has been told. Nothing was charged.");
    return FALSE;
}

// Before any buy request: can a parcel media view play for `viewer`?
// Otherwise llParcelMediaCommandList would fail silently after the charge.
integer can_buy()
{
    vector here = llGetPos();
    // A group-deeded object's owner is the group: this covers group land too.
    if (llGetLandOwnerAt(here) != llGetOwner())
        return refuse("this object must belong to the parcel's owner, or be deeded to the group that owns the parcel");
    list d = llGetObjectDetails(viewer, [OBJECT_POS]);
    if (d == [] || parcel(llList2Vector(d, 0)) != parcel(here)) {
        tell("Stand on this screen's parcel to buy: a paid movie plays only for avatars on it. Nothing was charged.");
        return FALSE;
    }
    list m = llParcelMediaQuery([PARCEL_MEDIA_COMMAND_TEXTURE, PARCEL_MEDIA_COMMAND_URL]);
    media_texture = llList2Key(m, 0);
    // `if (key)` is false for NULL_KEY and for a missing value alike.
    if (media_texture) if (llList2String(m, 1) == "") return TRUE;
    return refuse("set a media texture and leave the media URL empty in About Land > Media");
}

// Plays the view of the buyer at stride `i` for that avatar only.
play_for(integer i)
{
    if (shared) {
        llClearPrimMedia(FACE);
        shared = FALSE;
    }
    llSetTexture(media_texture, FACE);
    llParcelMediaCommandList([PARCEL_MEDIA_COMMAND_AGENT, llList2Key(buyers, i),
        PARCEL_MEDIA_COMMAND_URL, llList2String(buyers, i + 1),
        PARCEL_MEDIA_COMMAND_TYPE, "video/mp4",
        PARCEL_MEDIA_COMMAND_PLAY]);
    buyers = llListReplaceList(buyers, [TRUE], i + 3, i + 3);
}

prune()
{
    integer i = llGetListLength(buyers);
    while ((i -= 4) >= 0)
        if (llList2Integer(buyers, i + 2) <= llGetUnixTime())
            buyers = llDeleteSubList(buyers, i, i + 3);
}

ask_code()
{
    llListenRemove(listener);
    integer channel = -1 - (integer)llFrand(2000000000.0);
    listener = llListen(channel, "", viewer, "");
    llTextBox(viewer, "This movie has a price. Enter the link code from your account page ("
        + MANAGER_URL + "/account) within 60 seconds.", channel);
    llSetTimerEvent(60.0);
}

default
{
    touch_start(integer n)
    {
        key avatar = llDetectedKey(0);
        prune();
        integer i = llListFindList(buyers, [avatar]);
        if (~i) {
            if (llList2Integer(buyers, i + 3)) {
                llParcelMediaCommandList([PARCEL_MEDIA_COMMAND_AGENT, avatar, PARCEL_MEDIA_COMMAND_STOP]);
                buyers = llListReplaceList(buyers, [FALSE], i + 3, i + 3);
            } else play_for(i);
            return;
        }
        if (pending != NULL_KEY || listener) {
            if (avatar == viewer && listener) ask_code();
            else llRegionSayTo(avatar, 0, "This screen is busy; touch it again in a minute.");
            return;
        }
        viewer = avatar;
        step = 0;
        send("/api/v1/terminal/play", "&asset=" + ASSET_ID + "&avatar=" + (string)avatar);
    }

    listen(integer channel, string name, key id, string message)
    {
        llListenRemove(listener);
        listener = 0;
        llSetTimerEvent(0.0);
        step = 2;
        send("/api/v1/terminal/link", "&avatar=" + (string)viewer
            + "&code=" + llEscapeURL(llStringTrim(message, STRING_TRIM)));
    }

    timer()
    {
        llListenRemove(listener);
        listener = 0;
        llSetTimerEvent(0.0);
    }

    http_response(key id, integer status, list meta, string body)
    {
        if (id != pending) return;
        pending = NULL_KEY;
        string code = llJsonGetValue(body, ["error", "code"]);
        if (code == "payment_required") {
            if (can_buy()) {
                buy_request = (string)llGenerateKey();
                buy_retries = 0;
                buy();
            }
            return;
        }
        if (code == "avatar_not_linked") {
            ask_code();
            return;
        }
        if (code == "terminal_not_approved") {
            tell("Your account has not approved purchases from this screen's owner, so nothing was charged. Approve them (with a daily limit) on the page offered, then touch again.");
            llLoadURL(viewer, "Approve purchases from this screen's owner",
                MANAGER_URL + "/account/approvals?terminal=" + TERMINAL_ID);
            return;
        }
        if (code == "daily_cap_reached") {
            tell("The daily limit you set for this screen's owner (credits per 24 hours) is spent, so nothing was charged. You can raise it on your account page: "
                + MANAGER_URL + "/account/approvals?terminal=" + TERMINAL_ID);
            return;
        }
        if (code == "avatar_linked_elsewhere") {
            tell("This avatar is already linked to another account. Unlink it on that account's page ("
                + MANAGER_URL + "/account) first, then touch again.");
            return;
        }
        if (llJsonGetValue(body, ["linked"]) == JSON_TRUE) {
            if (can_buy()) buy();
            return;
        }
        // No answer or a server error: retry the same purchase once.
        if ((status == 499 || status >= 500) && step == 1 && buy_retries < 1) {
            buy_retries += 1;
            buy();
            return;
        }
        if (status != 200) {
            string message = llJsonGetValue(body, ["error", "message"]);
            if (message == JSON_INVALID) message = "HTTP " + (string)status;
            // The terminal's own troubles go to its owner; a buyer's account
            // matters go to the buyer alone.
            if (step == 0 || llSubStringIndex(code, "terminal_") == 0) {
                llOwnerSay("slmedia: " + message);
                message = "This screen cannot play now; its owner has been told.";
            } else if (step == 1 && (status == 499 || status >= 500))
                message = "No answer about your purchase. A view that was charged but never plays is refunded after it expires.";
            tell(message);
            return;
        }
        string url = llJsonGetValue(body, ["media_url"]);
        // No grant: nothing was bought (the owner's own movie, or it became
        // free): shared prim media, like a free movie.
        if (step == 0 || llJsonGetValue(body, ["grant_id"]) == JSON_NULL) {
            shared = TRUE;
            llSetPrimMediaParams(FACE,
                [PRIM_MEDIA_CURRENT_URL, url,
                 PRIM_MEDIA_HOME_URL, url,
                 PRIM_MEDIA_AUTO_PLAY, TRUE,
                 PRIM_MEDIA_AUTO_SCALE, TRUE,
                 PRIM_MEDIA_CONTROLS, PRIM_MEDIA_CONTROLS_MINI,
                 PRIM_MEDIA_PERMS_INTERACT, PRIM_MEDIA_PERM_ANYONE]);
            return;
        }
        // A purchase: parcel media for the buyer alone.
        buy_request = "";
        if (llStringLength(url) > 254) {
            llOwnerSay("slmedia: a paid media URL is longer than the 254 characters parcel media takes (docs/terminal.md).");
            tell("This view cannot play here and was not started. A view that never plays is refunded after it expires.");
            return;
        }
        integer expires = (integer)llJsonGetValue(body, ["expires_at"]);
        prune();
        integer i = llListFindList(buyers, [viewer]);
        if (~i) buyers = llDeleteSubList(buyers, i, i + 3);
        if (llGetListLength(buyers) >= 4 * MAX_BUYERS) buyers = llDeleteSubList(buyers, 0, 3);
        buyers += [viewer, url, expires, FALSE];
        string said = "";
        if (llJsonGetValue(body, ["charged_now"]) == JSON_TRUE)
            said = "Bought for " + llJsonGetValue(body, ["price"]) + " credits. ";
        tell(said + "\"" + llJsonGetValue(body, ["title"]) + "\" plays for you alone for "
            + (string)((expires - llGetUnixTime()) / 60)
            + " more minutes: touch the screen to stop it, and again to play it from the start.");
        play_for(llGetListLength(buyers) - 4);
    }
}
